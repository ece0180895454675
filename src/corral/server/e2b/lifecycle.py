"""E2B's sandbox lifecycle routes: create, get, list, kill, timeout, pause, connect,
resume, refresh."""

from __future__ import annotations

from corral.server.e2b.rest import Route

ROUTES: list[Route] = []

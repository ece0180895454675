"""E2B's snapshot and fork routes (helper G builds them)."""

from __future__ import annotations

from corral.server.e2b.rest import Route

ROUTES: list[Route] = []

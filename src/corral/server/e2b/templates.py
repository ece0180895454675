"""E2B's template routes: aliases and template builds (helper G builds them)."""

from __future__ import annotations

from corral.server.e2b.rest import Route

ROUTES: list[Route] = []

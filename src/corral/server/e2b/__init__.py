"""E2B compatibility: E2B's control-plane REST API and its in-sandbox daemon (envd),
served by Corral's app so that the official `e2b` SDK works against it.

    E2B_API_URL=http://<server>  E2B_SANDBOX_URL=http://<server>  E2B_API_KEY=<key>

`CorralApp` calls `E2bApp.serve` for each request after the port proxy; it answers the
requests `routing` says are E2B's and returns False for the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from corral.server.disconnect import Receive
from corral.server.e2b import lifecycle, metrics, network, snapshots, templates, uploads
from corral.server.e2b.envd import EnvdApp
from corral.server.e2b.rest import RestApp, Route
from corral.server.e2b.routing import is_envd, is_rest

if TYPE_CHECKING:
    from corral.config import Settings
    from corral.server.base import Services

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ROUTES: list[Route] = [
    *lifecycle.ROUTES,
    *snapshots.ROUTES,
    *templates.ROUTES,
    *metrics.ROUTES,
    *network.ROUTES,
]


class E2bApp:
    """E2B's REST API and envd, over Corral's services."""

    def __init__(self, services: Services, settings: Settings) -> None:
        self.settings = settings
        self.rest = RestApp(services, ROUTES)
        self.envd = EnvdApp(services, settings.ports_domain)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the request if it is E2B's (True), else leave it alone (False)."""
        if is_envd(scope, self.settings.ports_domain):
            await self.envd(scope, receive, send)
            return True
        if uploads.is_upload(scope):  # a COPY step's files: the link is the credential
            await uploads.serve_upload(self.rest.services, scope, receive, send)
            return True
        if is_rest(scope):
            await self.rest(scope, receive, send)
            return True
        return False

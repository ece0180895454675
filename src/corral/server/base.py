"""What every group of RPC handlers shares: the services, started with the app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral.errors import ServerUnavailable
from corral.server.auth import KeyCache, authenticate
from corral.server.ratelimit import RateLimits

if TYPE_CHECKING:
    from corral.jobs.queue import JobQueue
    from corral.sandboxes import SandboxManager
    from corral.store import Store, Team
    from corral.templates import TemplateCatalog


@dataclass
class Services:
    """The services behind the API; `manager` and `store` exist once the app has started."""

    store: Store | None = None
    manager: SandboxManager | None = None
    jobs: JobQueue | None = None
    templates: TemplateCatalog | None = None
    # API keys' teams, remembered briefly (`corral.server.auth`).
    keys: KeyCache = field(default_factory=KeyCache)
    # Requests and streams per API key (none unless the app sets its settings' limits).
    limits: RateLimits = field(default_factory=RateLimits)


class Handlers:
    def __init__(self, services: Services) -> None:
        self._services = services

    @property
    def _manager(self) -> SandboxManager:
        if self._services.manager is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return self._services.manager

    def _team(self, ctx: RequestContext[Any, Any]) -> Team:
        return authenticate(self._services, ctx)

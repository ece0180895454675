"""Where a sandbox's ports are reached through the server's port proxy (no I/O).

    sbx.get_host(8000)    # "8000-sb_….localhost:7878"  (E2B's form: prefix a scheme)
    sbx.get_url(8000)     # "http://127.0.0.1:7878/sandboxes/sb_…/ports/8000/?corral_token=…"

The path form needs no DNS; the host form needs the server's ports domain to resolve to
the server (`*.localhost` does on the server's own machine, elsewhere a wildcard record).
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from corral.client._models import SandboxInfo
from corral.errors import InvalidRequest

TOKEN_PARAM = "corral_token"


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequest(f"port {port!r} is not a TCP port: use a whole number 1 to 65535")
    return port


def port_host(info: SandboxInfo, server: str, port: int) -> str:
    """`<port>-<sandbox id>.<ports domain>`, with the server's port when its URL has one."""
    check_port(port)
    if not info.ports_domain:
        raise InvalidRequest(
            "the server did not say its ports domain (an older server?); use get_url(port)"
        )
    server_port = urlsplit(server).port
    host = f"{port}-{info.sandbox_id}.{info.ports_domain}"
    return f"{host}:{server_port}" if server_port else host


def port_url(
    info: SandboxInfo, server: str, port: int, path: str = "/", *, host_form: bool = False
) -> str:
    """A URL of `path` on `port` of the sandbox, with its traffic token unless its ports
    are public: the path form on the server's own address, or the host form."""
    check_port(port)
    if not path.startswith("/"):
        raise InvalidRequest(f"path {path!r} must start with '/'")
    parts = urlsplit(server)
    if host_form:
        base = f"{parts.scheme}://{port_host(info, server, port)}"
    else:
        base = f"{server.rstrip('/')}/sandboxes/{info.sandbox_id}/ports/{port}"
    url = base + path
    if info.traffic_token:
        separator = "&" if "?" in path else "?"
        url += f"{separator}{TOKEN_PARAM}={quote(info.traffic_token, safe='')}"
    return url

"""Running the server in the foreground: uvicorn or pyvoy (`corral.server.envoy`), JSON
logs, graceful shutdown.

SIGINT or SIGTERM stops accepting connections, lets open calls finish (for at most
`shutdown_grace` seconds), then stops the sandbox manager, which kills every sandbox.
A second signal exits at once; the sandboxes die with the process and the next start
marks their rows failed. SIGHUP reloads the configuration (`corral.reload`) between two
steps of the event loop: requests in flight carry on. It reads the TLS pair's files again
too (`tls.ServedCertificate`): new connections get a renewed certificate, open ones keep
theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn

from corral import logs, tracing
from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.reload import Reloader
from corral.server import tls

if TYPE_CHECKING:  # imported where uvicorn serves: under pyvoy, Envoy loads the app
    pass

log = logging.getLogger("corral.server")

EXIT_FORCED = 130
# A client run beside the server (`corral server --demo`), given the server's URL; it is
# cancelled when the server stops.
Companion = Callable[[str], Coroutine[Any, Any, None]]
T = TypeVar("T")
# A signal this soon after the first is the same one arriving twice (a terminal's Ctrl-C
# reaches `uv run` and its child; `timeout` signals its whole group), not a second one.
_SAME_SIGNAL = 0.5


class _Server(uvicorn.Server):
    """uvicorn's server with Corral's signal handling (and no re-raising of the signal)."""

    _first_signal = 0.0

    def __init__(self, config: uvicorn.Config, reloader: Reloader | None = None) -> None:
        super().__init__(config)
        self.reloader = reloader

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        if self.reloader is not None:
            # Run by the event loop, not in the signal handler: a handler runs between any
            # two bytecodes of the main thread, in the middle of whatever it was doing.
            loop = asyncio.get_running_loop()
            reload = self.reloader.reload
            original[signal.SIGHUP] = signal.signal(
                signal.SIGHUP, lambda sig, frame: loop.call_soon_threadsafe(reload)
            )
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.should_exit:
            self.should_exit = True
            self._first_signal = now
        elif now - self._first_signal > _SAME_SIGNAL:
            self.force_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response waits out the peer's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InvalidRequest(
                f"{host}:{port} is in use: stop the other server or pass --port"
            ) from None
        raise InvalidRequest(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def local_url(host: str, port: int, *, https: bool = False) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if https else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _run(serving: Coroutine[Any, Any, T], url: str, companion: Companion | None) -> T:
    """Serve until `serving` ends, with the companion (the demo) beside it; its result."""
    served = asyncio.create_task(serving)
    beside = None if companion is None else asyncio.create_task(companion(url))
    try:
        return await served
    finally:
        await stop_tasks(beside)


def http_server(settings: Settings) -> str:
    """The HTTP server `settings` ask for: pyvoy or uvicorn (`auto`: pyvoy if installed)."""
    installed = importlib.util.find_spec("pyvoy") is not None
    if settings.http_server == "auto":
        return "pyvoy" if installed else "uvicorn"
    if settings.http_server == "pyvoy" and not installed:
        raise InvalidRequest(
            "CORRAL_HTTP_SERVER=pyvoy, but pyvoy is not installed: install it "
            "(`uv sync`, `pip install pyvoy`) or use uvicorn"
        )
    return settings.http_server


def serve(
    settings: Settings, *, companion: Companion | None = None, reloader: Reloader | None = None
) -> int:
    """Run the API server until a signal (SIGHUP: `reloader` reloads); its exit code."""
    logs.configure(settings.log_level)
    tracing.configure(settings, "corral-server")
    pair = tls.load(settings)  # before the port: a bad file changes nothing
    sock = bind(settings.host, settings.port)
    if http_server(settings) == "pyvoy":
        port = sock.getsockname()[1]
        sock.close()  # Envoy listens on it itself (`corral.server.envoy`)
        return _serve_pyvoy(settings, port, pair, companion, reloader)
    from corral.server.app import CorralApp
    from corral.server.port_websocket import relay_protocol

    app = CorralApp(settings)
    certificate = None
    if pair is not None:
        # Its contexts are made as uvicorn makes its own, from `config` (below), once
        # uvicorn loads it and on each reload.
        certificate = tls.ServedCertificate(pair, lambda pair: _uvicorn_context(config, pair))
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_grace,
        timeout_keep_alive=30,
        # WebSocket upgrades: relayed to sandboxes' ports, byte for byte.
        ws=relay_protocol(app.ports),
        ssl_certfile=pair.cert if pair else None,
        ssl_keyfile=pair.key if pair else None,
        ssl_context_factory=None if certificate is None else lambda *_: certificate.listening(),
    )
    server = _Server(config, reloader)
    if reloader is not None:
        # uvicorn reads it when it shuts down: a new value holds for the next shutdown.
        reloader.live["shutdown_grace"] = functools.partial(
            setattr, config, "timeout_graceful_shutdown"
        )
        if certificate is not None:
            reloader.reread[tls.PAIR_SETTINGS] = functools.partial(_reload_tls, certificate.reload)
    url = _announce(settings.host, settings.port, pair, "uvicorn")
    asyncio.run(_run(server.serve(sockets=[sock]), url, companion))
    if server.force_exit:
        _exit_forced()
    if not server.started:
        return 1
    return 0


def _uvicorn_context(config: uvicorn.Config, pair: tls.TlsPair) -> ssl.SSLContext:
    """The context uvicorn would make for `pair` (`Config.load`'s default)."""
    return uvicorn.config.create_ssl_context(
        certfile=pair.cert,
        keyfile=pair.key,
        password=None,
        ssl_version=config.ssl_version,
        cert_reqs=config.ssl_cert_reqs,
        ca_certs=config.ssl_ca_certs,
        ciphers=config.ssl_ciphers,
        alpn_protocols=getattr(config.http_protocol_class, "alpn_protocols", None),
    )


def _reload_tls(serve: Callable[[Settings], tls.TlsPair], settings: Settings) -> None:
    """Serve the pair `settings` name with `serve` (uvicorn's or Envoy's), and say so."""
    _log_tls(serve(settings), "TLS certificate reloaded: new connections get it")


def _announce(host: str, port: int, pair: tls.TlsPair | None, http_server: str) -> str:
    """Log where the server listens (and its certificate); its local URL."""
    url = local_url(host, port, https=pair is not None)
    if pair is not None:
        _log_tls(pair, "serving HTTPS")
    log.info("listening", extra={"url": url, "http_server": http_server})
    return url


def _exit_forced() -> None:
    log.warning("forced exit: sandboxes die with this process")
    logging.shutdown()
    os._exit(EXIT_FORCED)


def _log_tls(pair: tls.TlsPair, msg: str) -> None:
    """Say which certificate the server presents, and how a client comes to trust it."""
    fields = {"cert": str(pair.cert), "sha256_fingerprint": pair.fingerprint}
    if pair.self_signed:
        fields["trust"] = tls.TRUST_HINT.format(cert=pair.cert)
        msg += " (a self-signed development certificate)"
    log.info(msg, extra=fields)


def _serve_pyvoy(
    settings: Settings,
    port: int,
    pair: tls.TlsPair | None,
    companion: Companion | None,
    reloader: Reloader | None,
) -> int:
    from corral.server.envoy import Supervisor

    supervisor = Supervisor(settings, port, pair, reloader)
    if reloader is not None:
        # The app, its log level included, lives in Envoy's process, which does not reload
        # it: only the TLS pair changes live, every other change is said to need a restart.
        reloader.live.clear()
        if pair is not None:
            reloader.reread[tls.PAIR_SETTINGS] = functools.partial(
                _reload_tls, supervisor.reload_tls
            )
    url = _announce(settings.host, port, pair, "pyvoy")
    status = asyncio.run(_run(supervisor.run(), url, companion))
    if supervisor.forced:
        _exit_forced()
    return 0 if status == 0 else 1

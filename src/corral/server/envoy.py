"""Serving the app with pyvoy: Envoy in a child process, the app inside it.

Envoy speaks HTTP/1.1 and HTTP/2 (cleartext, prior knowledge or upgrade) on one port with
HTTP/2 trailers, so native gRPC works beside Connect and gRPC-Web. pyvoy embeds Python in
Envoy: the app runs in Envoy's process (`corral.server.asgi`), on one Python thread (a
second would start a second app: a second store and sandbox manager), and this process
only supervises it:

- Before Envoy starts, the address is bound here once, so that a port in use is the same
  clear error as under uvicorn; Envoy then listens on it itself (a port taken in between
  makes Envoy fail to start, reported as such).
- SIGINT or SIGTERM: Envoy stops accepting connections (admin `drain_listeners`), open
  calls get up to `shutdown_grace` seconds to finish, then Envoy gets SIGTERM, which runs
  the app's shutdown (the sandbox manager kills its sandboxes). A second signal kills
  Envoy at once; the sandboxes die with it, as under uvicorn.
- Envoy's own log goes to stderr at warning; the app's JSON log is the same as under
  uvicorn.
- TLS (`corral.server.tls`'s pair) is Envoy's, on the same port, HTTP/2 by ALPN. Envoy
  takes the pair from a file-based SDS secret (`<data dir>/envoy/`) that it watches:
  SIGHUP checks the pair (`corral.reload`), then renames a new secret over the old, and
  new connections get the renewed certificate; open ones keep theirs. A pair Envoy refuses
  (its counters say so) is reported as not reloaded, the running one kept. The other settings
  live in Envoy's process, which does not reload them: a change is logged as needing a
  restart.

Envoy's default `stream_idle_timeout` (5 minutes) would reset an Exec or Logs stream
that is quiet that long: it is off here, as uvicorn has none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from pyvoy import PyvoyServer

from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.reload import Reloader
from corral.server import tls

log = logging.getLogger("corral.server")

APP = "corral.server.asgi:app"
# pyvoy sets these for Envoy (its Python's path and home, libpython preloaded); the app
# puts back this process's values (passed in INHERITED), or sandboxes, commands and
# builds would inherit them: a sandbox cannot even open the preloaded library.
ENVOY_VARIABLES = ("LD_PRELOAD", "PYTHONPATH", "PYTHONHOME")
INHERITED = "_CORRAL_ENVOY_INHERITED"
# The pid of `corral server`, with which Envoy dies (`corral.server.asgi`).
SUPERVISOR = "_CORRAL_ENVOY_SUPERVISOR"
# How often the drain looks at the number of open requests.
_POLL = 0.1
# How long a reload waits for Envoy to read a new TLS secret (it watches the file: it
# reads it within milliseconds), and how often it asks.
_SECRET_PATIENCE = 10.0
_SECRET_POLL = 0.02
# A signal this soon after the first is the same one arriving twice (see main._SAME_SIGNAL).
_SAME_SIGNAL = 0.5
# The name of the TLS pair's SDS secret, and the file Envoy watches for it.
SECRET = "corral_server_tls"
SECRET_FILE = "tls-secret.json"


def _inherited() -> str:
    """This process's values of the variables pyvoy sets for Envoy (None: unset)."""
    return json.dumps({name: os.environ.get(name) for name in ENVOY_VARIABLES})


def _secret(pair: tls.TlsPair) -> bytes:
    """The SDS secret (a DiscoveryResponse, in JSON) of `pair`: the certificate chain
    itself, the key by its file's name (no copy of it on disk). Envoy skips an update
    whose secret is unchanged, files unread: a renewed chain at the same path must show."""
    secret = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": SECRET,
        "tls_certificate": {
            "certificate_chain": {
                "inline_bytes": base64.b64encode(tls.read_chain(pair.cert)).decode()
            },
            "private_key": {"filename": str(pair.key)},
        },
    }
    return json.dumps({"resources": [secret]}).encode()


class _Envoy(PyvoyServer):
    """pyvoy's server with no idle timeout on streams, its admin API reachable, and its
    TLS pair from `secret_file` (an SDS secret Envoy watches) when given."""

    secret_file: Path | None = None

    def get_envoy_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_envoy_config()
        for listener in config["static_resources"]["listeners"]:
            for chain in listener.get("filter_chains", ()):
                for network_filter in chain.get("filters", ()):
                    typed = network_filter.get("typed_config", {})
                    if "HttpConnectionManager" in typed.get("@type", ""):
                        typed["stream_idle_timeout"] = "0s"
                transport = chain.get("transport_socket")
                if transport is not None and self.secret_file is not None:
                    common = transport["typed_config"]["common_tls_context"]
                    del common["tls_certificates"]
                    source = {"path_config_source": {"path": str(self.secret_file)}}
                    common["tls_certificate_sds_secret_configs"] = [
                        {"name": SECRET, "sds_config": {**source, "resource_api_version": "V3"}}
                    ]
                    # Envoy asks any SDS source with a node's name, even a file.
                    config["node"] = {"id": "corral-server", "cluster": "corral"}
        return config

    def admin(self, path: str, method: str = "GET") -> bytes:
        address = self._admin_address
        if address is None:
            raise RuntimeError("Envoy has no admin address yet")
        request = urllib.request.Request(f"http://{address}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            body: bytes = response.read()
            return body

    def secret_updates(self) -> dict[str, int]:
        """Envoy's counts of its reads of the TLS secret: attempt, success, rejected,
        failure (a file it could not read)."""
        path = f"/stats?format=json&filter=^sds\\.{SECRET}\\.update_"
        stats = json.loads(self.admin(path))
        prefix = f"sds.{SECRET}.update_"
        return {
            s["name"].removeprefix(prefix): int(s["value"])
            for s in stats.get("stats", ())
            if "value" in s and s["name"].startswith(prefix)
        }

    def active_requests(self) -> int:
        """Requests open on the API's listener (the admin's own are not counted)."""
        path = "/stats?format=json&filter=^http\\.ingress_http\\.downstream_rq_active$"
        stats = json.loads(self.admin(path))
        return sum(int(s["value"]) for s in stats.get("stats", ()) if "value" in s)


def _refused(pair: tls.TlsPair) -> str:
    return (
        f"Envoy refused the TLS pair {pair.cert} and {pair.key} (its own log, on the "
        "server's stderr, says why; Envoy takes RSA keys of 2048 bits or more and ECDSA "
        "keys on P-256, P-384 or P-521)"
    )


def _no_reload() -> None:
    log.warning("SIGHUP ignored: this server was started without a configuration to reload")


class Supervisor:
    """Runs Envoy until a signal; `forced` once a second signal killed it."""

    def __init__(
        self,
        settings: Settings,
        port: int,
        pair: tls.TlsPair | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.settings = settings
        self.reloader = reloader
        self.envoy = _Envoy(
            APP,
            address=settings.host,
            port=port,
            # TLS on the same port (ALPN: h2, then http/1.1); no HTTP/3 (a UDP port more).
            tls_cert=pair.cert if pair else None,
            tls_key=pair.key if pair else None,
            tls_enable_http3=False,
            worker_threads=1,
            lifespan=True,
            log_level="warning",
            env=settings.to_env()
            | {"CORRAL_PORT": str(port), INHERITED: _inherited(), SUPERVISOR: str(os.getpid())},
            stdout=None,
            stderr=None,
        )
        self.forced = False
        self._stopping: asyncio.Task[None] | None = None
        self._first_signal = 0.0
        self._pair = pair

    def reload_tls(self, settings: Settings) -> tls.TlsPair:
        """Have Envoy serve the pair `settings` name to new connections, once it passes
        the checks made at start and Envoy took it (else InvalidRequest, and the running
        pair is kept). Envoy is waited for here, for at most `_SECRET_PATIENCE`."""
        pair = tls.load_again(settings)
        if self.envoy.secret_file is None or self._pair is None:
            raise RuntimeError("Envoy was started without TLS")
        try:
            if not self._serve_secret(pair):
                self._serve_secret(self._pair)  # the file says again what Envoy serves
                raise InvalidRequest(_refused(pair) + ": the running pair is kept")
        except OSError as exc:  # its admin API is gone: Envoy is stopping
            raise InvalidRequest(
                f"could not ask Envoy whether it took the TLS pair: {exc}"
            ) from exc
        self._pair = pair
        return pair

    def _serve_secret(self, pair: tls.TlsPair) -> bool:
        """Write `pair` as Envoy's secret (Envoy sees the rename); whether it took it."""
        assert self.envoy.secret_file is not None
        before = self.envoy.secret_updates()
        tls.write_whole(self.envoy.secret_file, _secret(pair), 0o600)
        return self._secret_taken(before)

    def _secret_taken(self, before: dict[str, int]) -> bool:
        """Whether Envoy's next read of its secret after its counts `before` took it:
        only its counters say so (its BoringSSL refuses some pairs that our checks, with
        Python's OpenSSL, take: a key on the secp256k1 curve for one)."""
        deadline = time.monotonic() + _SECRET_PATIENCE
        while time.monotonic() < deadline:
            now = self.envoy.secret_updates()
            if now.get("attempt", 0) > before.get("attempt", 0):
                refused = ("rejected", "failure")
                return not any(now.get(n, 0) > before.get(n, 0) for n in refused)
            time.sleep(_SECRET_POLL)
        return False

    def on_signal(self) -> None:
        now = time.monotonic()
        if self._stopping is None:
            self._first_signal = now
            self._stopping = asyncio.create_task(self._drain_and_stop())
        elif now - self._first_signal > _SAME_SIGNAL and not self.forced:
            self.forced = True
            process = self.envoy._process
            if process is not None and process.returncode is None:
                process.kill()

    async def _drain_and_stop(self) -> None:
        """Stop taking connections, let open calls finish (for at most the grace), stop."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self.envoy.admin, "/drain_listeners", "POST")
            deadline = loop.time() + self.settings.shutdown_grace
            while loop.time() < deadline:
                if await asyncio.to_thread(self.envoy.active_requests) == 0:
                    break
                await asyncio.sleep(_POLL)
        except OSError as exc:  # Envoy's admin is gone: it is stopping already
            log.debug("draining Envoy failed", extra={"error": str(exc)})
        process = self.envoy._process
        if process is not None and process.returncode is None:
            process.terminate()  # Envoy's SIGTERM: the app's lifespan shutdown runs

    async def run(self) -> int:
        """Envoy's exit status (None: it never started)."""
        loop = asyncio.get_running_loop()
        if self._pair is not None:
            # A directory of the secret's own (Envoy watches the secret file's directory),
            # the same at every start: a killed server leaves nothing more behind.
            secrets = self.settings.data_dir.absolute() / "envoy"
            secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.envoy.secret_file = secrets / SECRET_FILE
            tls.write_whole(self.envoy.secret_file, _secret(self._pair), 0o600)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)
        reload = _no_reload if self.reloader is None else self.reloader.reload
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            await self.envoy.start()
            if self._pair is not None and not await asyncio.to_thread(self._secret_taken, {}):
                # Its TLS port would take connections and fail every handshake.
                log.error(_refused(self._pair) + ": the server stops")
                await self.envoy.stop()
                return 1
            status = await self.envoy.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await stop_tasks(self._stopping)
        return 1 if status is None else status

    def url(self) -> str:
        from corral.server.main import local_url

        return local_url(self.settings.host, self.envoy.listener_port)

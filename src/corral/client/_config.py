"""Where the SDK and CLI find the server and the API key: arguments, environment, contexts.

kubectl-style contexts live in `~/.corral/config` (or `$CORRAL_CONFIG`):

    currentContext: local
    contexts:
      local:
        server: http://127.0.0.1:7878
        apiKey: crl_…
        timeoutSeconds: 60
        caFile: /etc/corral/ca.pem     # https only: the CAs to verify it with

Each setting is taken from the first of: an explicit argument, `CORRAL_SERVER` /
`CORRAL_API_KEY` / `CORRAL_CA_FILE`, the context named by the argument or
`CORRAL_CONTEXT` or `currentContext`. With no server anywhere, the local default `http://127.0.0.1:7878`;
with no key anywhere and a server on this machine, the key a local server wrote for
its default team (`<data dir>/default.key`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from corral.client._tls import check_ca_file
from corral.config import Settings
from corral.errors import InvalidRequest, NotFound

DEFAULT_SERVER = "http://127.0.0.1:7878"
DEFAULT_TIMEOUT = 60.0
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("CORRAL_CONFIG") or Path.home() / ".corral" / "config")


def normalize_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"server {server!r} is not a URL like http://127.0.0.1:7878")
    return server


@dataclass
class Context:
    server: str
    api_key: str | None = None
    timeout_seconds: float | None = None
    ca_file: str | None = None

    def to_yaml(self) -> dict[str, Any]:
        data: dict[str, Any] = {"server": self.server}
        if self.api_key:
            data["apiKey"] = self.api_key
        if self.timeout_seconds is not None:
            data["timeoutSeconds"] = self.timeout_seconds
        if self.ca_file:
            data["caFile"] = self.ca_file
        return data


@dataclass
class ConfigFile:
    """The contexts file; `save` writes it readable by its owner only (it holds keys)."""

    path: Path
    current: str | None = None
    contexts: dict[str, Context] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> ConfigFile:
        path = path or config_path()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise InvalidRequest(f"cannot read the config {path}: {exc}") from None
        import yaml  # only now: most runs have no config file, and yaml costs ~10 ms

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"cannot read the config {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("contexts") or {}, dict):
            raise InvalidRequest(f"{path} is not a Corral config: see `corral context --help`")
        contexts = {}
        for name, value in (data.get("contexts") or {}).items():
            if not isinstance(value, dict) or not isinstance(value.get("server"), str):
                raise InvalidRequest(f"{path}: context {name!r} needs a server")
            timeout, ca_file = value.get("timeoutSeconds"), value.get("caFile")
            contexts[str(name)] = Context(
                server=value["server"],
                api_key=value.get("apiKey"),
                timeout_seconds=None if timeout is None else float(timeout),
                ca_file=None if ca_file is None else str(ca_file),
            )
        current = data.get("currentContext")
        return cls(path, None if current is None else str(current), contexts)

    def save(self) -> None:
        import yaml

        data: dict[str, Any] = {
            "currentContext": self.current,
            "contexts": {name: ctx.to_yaml() for name, ctx in sorted(self.contexts.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, self.path)

    def context(self, name: str | None) -> Context | None:
        """The named context, else the current one, else None."""
        if name is not None:
            if name not in self.contexts:
                known = ", ".join(sorted(self.contexts)) or "none yet"
                raise NotFound(
                    f"no context {name!r} in {self.path} (known: {known}); "
                    f"add it with `corral context set {name} --server URL`"
                )
            return self.contexts[name]
        return self.contexts.get(self.current) if self.current else None


PROTOCOLS = ("connect", "grpc")


@dataclass(frozen=True)
class ClientSettings:
    """Where to send calls, with which key, (https) which CAs verify the server, and
    `protocol` (CORRAL_PROTOCOL): `connect` (any server) or `grpc` (native gRPC over HTTP/2:
    a server on pyvoy)."""

    server: str
    api_key: str | None
    timeout: float
    # A PEM file of CA certificates (absolute path) in place of the system's; None: those.
    ca_file: str | None = None
    protocol: str = "connect"

    @classmethod
    def resolve(
        cls,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        timeout: float | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        env = os.environ if environ is None else environ
        ctx = ConfigFile.load(config_path(env)).context(context or env.get("CORRAL_CONTEXT"))
        server = server or env.get("CORRAL_SERVER") or (ctx.server if ctx else DEFAULT_SERVER)
        server = normalize_server(server)
        api_key = api_key or env.get("CORRAL_API_KEY") or (ctx.api_key if ctx else None)
        if not api_key and urlsplit(server).hostname in _LOOPBACK:
            api_key = _local_default_key(env)
        if timeout is None:
            timeout = (ctx.timeout_seconds if ctx else None) or DEFAULT_TIMEOUT
        given = None if ca_file is None else os.fspath(ca_file)
        ca = given or env.get("CORRAL_CA_FILE") or (ctx.ca_file if ctx else None)
        https = urlsplit(server).scheme == "https"  # plain http: nothing to verify
        ca = check_ca_file(ca) if ca and https else None
        protocol = env.get("CORRAL_PROTOCOL") or "connect"
        if protocol not in PROTOCOLS:
            raise InvalidRequest(
                f"CORRAL_PROTOCOL={protocol!r} is unknown: use connect (any Corral server) or "
                "grpc (native gRPC: a server run with --http-server pyvoy)"
            )
        return cls(server, api_key or None, timeout, ca, protocol)


def _local_default_key(environ: Mapping[str, str]) -> str | None:
    try:
        settings = Settings.from_env(environ)
        return (settings.data_dir / "default.key").read_text().strip() or None
    except (OSError, InvalidRequest):
        return None

"""One typed Settings object for every entry point (CLI, server, tests, benchmarks).

Library code never reads the environment: entry points build a ``Settings`` (usually
with ``Settings.from_env()``) and pass it down.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from corral.errors import CorralError, InvalidRequest, UnknownBackend
from corral.network.policy import NetworkCap

ENV_PREFIX = "CORRAL_"
HTTP_SERVERS = ("auto", "pyvoy", "uvicorn")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Host ids per uid slot (root mode): a sandbox's uids 0-65535, as on any Linux system.
IDS_PER_SLOT = 65536
# runsc's platforms, best first after `auto` (see corral.isolation.gvisor).
GVISOR_PLATFORMS = ("auto", "systrap", "kvm", "ptrace")
# The templates a warm pool may hold: the host's /usr and the server's `base` (E2B's
# default); a team's own templates start cold.
POOL_TEMPLATES = ("host", "base")
# CORRAL_METRICS: what `GET /metrics` on the API port asks for (see `Settings.metrics`).
METRICS_MODES = ("auth", "on", "off")


def _default_data_dir() -> Path:
    system = Path("/var/lib/corral")
    if os.geteuid() == 0 and (system.exists() or os.access(system.parent, os.W_OK)):
        return system
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "corral"


def _default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/corral")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "corral" if xdg else Path(f"/tmp/corral-{os.geteuid()}")


@dataclass(frozen=True)
class Settings:
    """Where Corral keeps its state and how it isolates sandboxes.

    Every field can be set from the environment as ``CORRAL_<FIELD>`` (upper case).
    """

    data_dir: Path = field(default_factory=_default_data_dir)
    # Per-sandbox directories, mounts and state files live here; the reaper scans it.
    runtime_dir: Path = field(default_factory=_default_runtime_dir)
    # The isolation tier of this server's or worker's warm pools and of the jobs that name
    # none (`auto`: the strongest the host offers). Not CORRAL_ISOLATION: that one is the
    # CLI's, the tier `corral run` and `corral sandbox create` ask for.
    default_isolation: str = "auto"
    # The `process` backend runs code with no isolation at all: only for development.
    allow_process_backend: bool = False
    # The store: any SQLAlchemy URL; empty means SQLite at <data_dir>/corral.db.
    database_url: str = ""
    # PostgreSQL's connections per process: kept open, and opened beyond them under load
    # (each process also holds one more, outside the pool, that LISTENs for wake-ups).
    database_pool_size: int = 5
    database_pool_overflow: int = 10
    # Sandboxes' cgroups go under this name in every hierarchy (v1) or the unified tree (v2).
    cgroup_parent: str = "corral"
    # When Corral runs as root, each live sandbox owns one of `uid_slots` ranges of
    # 65536 host ids (slot N: [uid_base + N*65536, +65536)), its uids 0-65535 inside, so
    # two sandboxes never share a host identity and none is the host's root: slots are
    # taken in a registry per base under /run/corral/host-slots, so this holds across
    # runtime dirs and installs on one host; two installs with different bases must keep
    # their ranges apart. The last id must stay below 2**32 - 1 (checked at start).
    uid_base: int = 1_700_000_000
    uid_slots: int = 4096
    # The interpreter that runs the guest agent inside `host`-template sandboxes.
    guest_python: str = "/usr/bin/python3"
    # The gvisor tier's runsc platform: auto (the best this host's runsc runs: systrap,
    # then kvm, then ptrace), or one of them by name.
    gvisor_platform: str = "auto"
    # The microvm tier's guest kernel .debs (`corral.isolation.guest_kernel`): where
    # `make setup` downloads them; empty: <data_dir>/guest-kernel.
    guest_kernel_dir: str = ""
    # The API server (`corral server`): where it listens, how many started sandboxes it
    # keeps ready so that a create is instant, how long a shutdown waits for open calls.
    host: str = "127.0.0.1"
    port: int = 7878
    pool_size: int = 2
    # Warm pools per tier and template, beside `pool_size`'s (which keeps that many of
    # `host` and of the server's `base` on `default_isolation`): a comma list of
    # TIER:TEMPLATE=SIZE, TEMPLATE `host` or `base`, e.g. "gvisor:base=1,microvm:base=1";
    # an entry for a pool `pool_size` makes too sets its size instead (0: none).
    pools: str = ""
    shutdown_grace: int = 10
    # The HTTP server: `uvicorn` (HTTP/1.1: Connect and gRPC-Web), `pyvoy` (Envoy: HTTP/1.1
    # and HTTP/2, so native gRPC too; no WebSocket relay to sandbox ports yet), or `auto`:
    # pyvoy when it is installed. uvicorn is the default: see `corral.server.envoy`.
    http_server: str = "uvicorn"
    log_level: str = "info"
    # HTTPS on the server's port (corral.server.tls): a PEM certificate (then its chain)
    # and its unencrypted key, or a self-signed pair for development made in
    # <data_dir>/tls and reused across restarts. Neither: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    tls_self_signed: bool = False
    # OpenTelemetry traces of the server's requests and the workers' jobs (`corral.tracing`):
    # off, or on to export them over OTLP/HTTP as the standard OTEL_* variables say
    # (OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4318). Needs the `otel` extra.
    otel: bool = False
    # Port exposure: the server's port proxy answers host names `<port>-<sandbox id>.`
    # followed by this domain (E2B's form; point a wildcard DNS record at the server), as
    # well as paths `/sandboxes/<id>/ports/<port>/`. "localhost": `*.localhost` is
    # loopback, so `8000-<id>.localhost:<server port>` works on the server's own machine.
    ports_domain: str = "localhost"
    # Prometheus metrics (docs/metrics.md). `GET /metrics` on the API port: `auth` (the
    # default) asks for a key of the default team (the operator's: a tenant's key would
    # show it every team's aggregate activity), `on` asks for none (a private API port),
    # `off` serves none. `metrics_port` (0: none) serves them without a key on a port of
    # their own, at `metrics_host`: how `corral worker` exposes its metrics, and how a
    # server with a public API port exposes them to a Prometheus on a private network.
    metrics: str = "auth"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Jobs: how many a process's worker pool runs at once (`corral server` runs one pool;
    # 0 leaves jobs to `corral worker` processes), how many warm sandboxes it keeps for
    # them (at most one per worker; 0: every job of one command starts a one-shot
    # sandbox), the default timeout of a job, how much output a job keeps, and the lease
    # a worker renews by heartbeat: a job whose worker is silent this long is requeued.
    job_workers: int = 4
    job_pool: int = 4
    job_timeout: int = 300
    job_log_limit: int = 16 * 1024 * 1024
    job_lease: int = 30
    # Finished jobs are deleted, with their events and logs, this many seconds after they
    # end (by a sweep in every server and worker process); 0 keeps them forever.
    job_retention: int = 7 * 24 * 3600
    # Retention of the rest (`corral.jobs.retention`, by the same sweep; 0 keeps them):
    # ended sandboxes' rows, with their events and metric points, this many seconds after
    # they end; any sandbox's state and network events older than `event_retention`; and
    # metric points older than `metric_retention` (keep it at least a day, the span of
    # the longest metrics ring, or live sandboxes' 24h graphs lose their start).
    sandbox_retention: int = 7 * 24 * 3600
    event_retention: int = 30 * 24 * 3600
    metric_retention: int = 2 * 24 * 3600
    # Rate limits per API key, per server process (`corral.server.ratelimit`): requests a
    # second (a token bucket refilled at this rate; 0: no limit), the burst a key may send
    # at once, and its streams open at once (exec, attach, file transfers, log and event
    # follows; 0: no limit). A request past them is refused with RESOURCE_EXHAUSTED (429)
    # and the seconds to wait.
    api_rate: float = 1000.0
    api_burst: int = 2000
    api_streams: int = 128
    # Job callbacks: internal receivers the server may POST to (comma-separated CIDRs,
    # addresses and host names; by default only public addresses are called back), and
    # how many POSTs a process has in flight at once: in all, to one host:port, per team.
    callback_allow: str = ""
    # The DNS servers sandboxes' own resolvers ask (comma-separated addresses, each with
    # an optional port); empty: the host's, from its /etc/resolv.conf.
    network_dns: str = ""
    callback_concurrency: int = 64
    callback_per_destination: int = 4
    callback_per_team: int = 16
    # Host admission: the memory limits of every live sandbox of this process (API, pooled,
    # job and one-shot ones) add up to at most (physical memory - memory_reserve_mib) x
    # memory_overcommit. 1.0 is safe: with no swap, and storage on tmpfs charged to each
    # sandbox's memory, every sandbox can use all it was promised at once. Above 1.0 the
    # host bets that they won't, and the kernel's OOM killer settles the bet.
    memory_overcommit: float = 1.0
    # Memory kept out of the sandboxes' reach: the server, its workers and the kernel.
    memory_reserve_mib: int = 512
    # How often a running server or worker removes what the sandboxes of dead Corral
    # processes left (mounts, cgroups, uid slots, files); every process also does at start.
    reap_interval: int = 60
    # Sandboxes' and jobs' network: the modes this server allows at all (a comma list of
    # none, internet, allowlist; `none` is always allowed), the teams (by name) that may
    # use `internet` ("*": every team), what every allowlist entry must fall within
    # (domains, wildcards, CIDRs; empty: any public destination), and the always-denied
    # ranges (private, link-local …) an allowlist may name (CIDRs; empty: none).
    network_modes: str = "none,internet,allowlist"
    network_internet_teams: str = "*"
    network_allow_cap: str = ""
    network_private_allow: str = ""
    # The network of a sandbox created through E2B's API that asks for nothing narrower
    # (E2B's `allow_internet_access=True`, its SDK's default) and whose template names
    # none: `none` (Corral's default: fail closed, warm pool) or `internet` (E2B's).
    e2b_network: str = "none"
    # Directories (a comma list) on this server's disk from which template builds may
    # import local image archives (FROM docker-archive:PATH, oci-archive:PATH, oci:DIR);
    # empty: none. An API caller otherwise names paths of the server's file system.
    image_archive_dirs: str = ""
    # Registries a template build may pull from although they are not public (loopback,
    # private, link-local ...): CIDRs and host names, comma-separated, as CALLBACK_ALLOW.
    registry_allow: str = ""
    # Network events kept per sandbox (DNS answers, connections allowed and denied); past
    # this the oldest are deleted, and the count deleted is shown with the rest.
    network_events_max: int = 10_000
    # Named volumes: how many a team may have and how many MiB their sizes add up to (a
    # volume's size is its bound; the host's disk holds only what is written).
    volume_max_count: int = 20
    volume_max_mib: int = 10_240
    # Templates: per team, at most this many template names and this many bytes of
    # file data in its ready templates' layers; the Debian mirror of `debian` build bases
    # (a URL or a whole sources.list line).
    template_max_count: int = 50
    # A template build (a job) stops after this many seconds.
    build_timeout: int = 3600
    template_max_bytes: int = 20 * 1024**3
    debian_mirror: str = "http://deb.debian.org/debian"
    # The server's `base` template (E2B's default, every team's unless it has its own):
    # built from `debian_mirror` on its first use (`first-use`), when the server starts
    # (`start`), or never (`off`). See corral.templates.base.
    base_template: str = "first-use"
    # A file of CORRAL_<FIELD>=VALUE lines (systemd's EnvironmentFile form) that
    # `corral server` and `corral worker` read at start and again on SIGHUP; its values win
    # over the process's environment, a command-line flag wins over both. `corral install`
    # writes /etc/corral/corral.env and points the units at it.
    env_file: str = ""

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """`from_env` with the values of the env file (`env_file`, given in `overrides` or
        the environment) over the environment's."""
        env = os.environ if environ is None else environ
        path = overrides.get("env_file") or env.get(ENV_PREFIX + "ENV_FILE")
        if path:
            env = {**env, **read_env_file(Path(path))}
        return cls.from_env(env, **overrides)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values no entry point could use, naming the variable to fix."""
        if self.log_level.lower() not in LOG_LEVELS:
            raise InvalidRequest(
                f"CORRAL_LOG_LEVEL={self.log_level!r} is unknown: use {', '.join(LOG_LEVELS)}"
            )
        if self.database_url:
            check_database_url(self.database_url)
        if self.database_pool_size < 1 or self.database_pool_overflow < 0:
            raise InvalidRequest(
                f"CORRAL_DATABASE_POOL_SIZE={self.database_pool_size} and "
                f"CORRAL_DATABASE_POOL_OVERFLOW={self.database_pool_overflow}: keep at least "
                "one connection open (size >= 1) and allow 0 or more beyond it (overflow)"
            )
        if self.http_server not in HTTP_SERVERS:
            raise InvalidRequest(
                f"CORRAL_HTTP_SERVER={self.http_server!r} is unknown: use {', '.join(HTTP_SERVERS)}"
            )
        domain = self.ports_domain.strip(".")
        if not domain or not all(c.isascii() and (c.isalnum() or c in ".-") for c in domain):
            raise InvalidRequest(
                f"CORRAL_PORTS_DOMAIN={self.ports_domain!r} is not a domain name: use one like "
                "sandboxes.example.com (its wildcard record pointing at this server), or "
                "localhost (the default)"
            )
        if self.base_template not in ("first-use", "start", "off"):
            raise InvalidRequest(
                f"CORRAL_BASE_TEMPLATE={self.base_template!r} is unknown: use first-use "
                "(the default), start or off"
            )
        if self.gvisor_platform not in GVISOR_PLATFORMS:
            raise InvalidRequest(
                f"CORRAL_GVISOR_PLATFORM={self.gvisor_platform!r} is unknown: use "
                f"{', '.join(GVISOR_PLATFORMS)} (auto, the default, picks the best that works)"
            )
        if self.metrics not in METRICS_MODES:
            raise InvalidRequest(
                f"CORRAL_METRICS={self.metrics!r} is unknown: use auth (the default: the "
                "default team's key), on (no key) or off (no /metrics on the API port)"
            )
        if self.metrics_port > 65535:
            raise InvalidRequest(
                f"CORRAL_METRICS_PORT={self.metrics_port} is not a port: use 1-65535, or 0 "
                "(the default) for no metrics listener"
            )
        if self.e2b_network not in ("none", "internet"):
            raise InvalidRequest(
                f"CORRAL_E2B_NETWORK={self.e2b_network!r} is unknown: use none (the default) "
                "or internet"
            )
        if self.api_rate < 0 or (self.api_rate > 0 and self.api_burst < 1):
            raise InvalidRequest(
                f"CORRAL_API_RATE={self.api_rate:g} and CORRAL_API_BURST={self.api_burst}: use "
                "a rate of 0 (no limit) or more, and a burst of at least 1 with a rate"
            )
        if self.network_events_max < 1:
            raise InvalidRequest(
                f"CORRAL_NETWORK_EVENTS_MAX={self.network_events_max} keeps no event: use 1 "
                "or more (the default keeps 10000 per sandbox)"
            )
        if self.uid_slots < 1 or self.uid_base < 65536:
            raise InvalidRequest(
                f"CORRAL_UID_BASE={self.uid_base} and CORRAL_UID_SLOTS={self.uid_slots}: "
                "use a base of 65536 or more (ids no host user has) and at least one slot"
            )
        if self.uid_base + self.uid_slots * IDS_PER_SLOT > 2**32 - 1:
            raise InvalidRequest(
                f"CORRAL_UID_BASE={self.uid_base} + CORRAL_UID_SLOTS={self.uid_slots} x "
                f"{IDS_PER_SLOT} ids passes the largest uid (2**32 - 2): lower the base or "
                f"the slots (at most {(2**32 - 1 - self.uid_base) // IDS_PER_SLOT} with this base)"
            )
        self.network_cap()
        parse_pools(self.pools)

    def warm_pools(self, pool_size: int | None = None) -> tuple[PoolSpec, ...]:
        """The warm pools to keep: `pool_size` (default: this one's) of `host` and `base`
        on the default tier, then CORRAL_POOLS's (a later one of the same tier and
        template replaces an earlier one: see `pool_plan`)."""
        size = self.pool_size if pool_size is None else pool_size
        implied = tuple(
            PoolSpec(self.default_isolation, template, size, implied=True)
            for template in POOL_TEMPLATES
        )
        return implied + parse_pools(self.pools)

    def pool_plan(
        self, tier_of: Callable[[str], str], pool_size: int | None = None
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], str]]:
        """The size of each warm pool by (tier, template), its tier named by `tier_of`
        (`auto` -> the tier it stands for; CorralError where the host lacks it), and why
        not for the pools whose tier the host lacks. A tier no Corral has is refused."""
        sizes: dict[tuple[str, str], int] = {}
        missing: dict[tuple[str, str], str] = {}
        for pool in self.warm_pools(pool_size):
            try:
                tier = tier_of(pool.tier)
            except UnknownBackend as exc:
                if pool.implied:  # CORRAL_DEFAULT_ISOLATION's: every create says so
                    missing[(pool.tier, pool.template)] = str(exc)
                    continue
                raise InvalidRequest(f"CORRAL_POOLS={self.pools!r}: {exc}") from None
            except CorralError as exc:
                missing[(pool.tier, pool.template)] = str(exc)
                continue
            sizes[(tier, pool.template)] = pool.size
        return sizes, missing

    def network_cap(self) -> NetworkCap:
        """What this server lets its teams' sandboxes and jobs reach (CORRAL_NETWORK_*)."""
        return NetworkCap.parse(
            self.network_modes,
            self.network_internet_teams,
            self.network_allow_cap,
            self.network_private_allow,
        )

    def to_env(self) -> dict[str, str]:
        """These settings as the variables `from_env` reads back: for a server process
        started by this one (pyvoy's Envoy)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            env[ENV_PREFIX + f.name.upper()] = text
        return env

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def read_env_file(path: Path) -> dict[str, str]:
    """The CORRAL_<FIELD>=VALUE lines of an env file, or InvalidRequest naming the line.

    The form systemd's EnvironmentFile= reads: blank lines and lines starting with # or ;
    are skipped, a value may be quoted with " or '. Every name must be a setting's (a
    misspelt one would otherwise be silently ignored: its setting kept as it was).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidRequest(
            f"CORRAL_ENV_FILE={str(path)!r} cannot be read ({exc.strerror}): fix the path "
            "or the file's permissions"
        ) from None
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"CORRAL_ENV_FILE={str(path)!r} is not UTF-8 text: write it as CORRAL_<SETTING>=VALUE "
            "lines"
        ) from None
    names = {ENV_PREFIX + f.name.upper() for f in fields(Settings)} - {ENV_PREFIX + "ENV_FILE"}
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in names:
            raise InvalidRequest(
                f"{path}:{number}: {line[:80]!r} is not CORRAL_<SETTING>=VALUE with a setting "
                "of `corral server` (see the README's settings)"
            )
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name] = value
    return values


def _parse(name: str, type_name: str, raw: str) -> Any:
    var = ENV_PREFIX + name.upper()
    if type_name == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise InvalidRequest(f"{var}={raw!r} is not a boolean; use 1 or 0")
    if type_name == "int":
        try:
            number = int(raw)
        except ValueError:
            raise InvalidRequest(f"{var}={raw!r} is not an integer") from None
        if number < 0:  # every count, size, port and duration here is 0 or more
            raise InvalidRequest(f"{var}={raw!r} is negative: use 0 or more")
        return number
    if type_name == "float":
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InvalidRequest(f"{var}={raw!r} is not a number")
        return value
    if type_name == "Path":
        return Path(raw)
    return raw


@dataclass(frozen=True)
class PoolSpec:
    """One warm pool: `size` ready sandboxes of `template` on `tier` (a tier's name or
    auto); `implied`: made by CORRAL_POOL_SIZE, not named in CORRAL_POOLS."""

    tier: str
    template: str
    size: int
    implied: bool = False


def parse_pools(text: str) -> tuple[PoolSpec, ...]:
    """CORRAL_POOLS's entries (TIER:TEMPLATE=SIZE, comma-separated), or InvalidRequest."""
    pools = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        pool, _, size = entry.partition("=")
        tier, _, template = pool.partition(":")
        tier, template = tier.strip(), template.strip()
        if not tier or template not in POOL_TEMPLATES or not size.strip().isdigit():
            raise InvalidRequest(
                f"CORRAL_POOLS entry {entry!r} is not TIER:TEMPLATE=SIZE with TEMPLATE "
                f"{' or '.join(POOL_TEMPLATES)} and SIZE a whole number: use e.g. "
                "gvisor:base=1,microvm:base=1"
            )
        pools.append(PoolSpec(tier, template, int(size)))
    return tuple(pools)


def check_database_url(url: str) -> None:
    """A URL of the form SQLAlchemy takes (`dialect[+driver]://…`), or InvalidRequest.

    Only the form: whether the dialect and its driver exist is the store's to say when it
    opens the database (config stays free of SQLAlchemy).
    """
    scheme, sep, _ = url.partition("://")
    dialect = scheme.partition("+")[0]
    if not sep or not dialect or not dialect.replace("_", "").isalnum():
        shown = "…@" + url.rpartition("@")[2] if "@" in url else url  # never a password
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={shown!r} is not a database URL: use e.g. "
            "sqlite:////var/lib/corral/corral.db, or leave it empty for SQLite in the data dir"
        )

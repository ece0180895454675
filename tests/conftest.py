"""Shared fixtures: real engines and real sandboxes, on every tier this host offers."""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import pytest

from corral.config import Settings
from corral.limits import Limits, host_memory_mib
from corral.store import Store, Team
from corral.store.job_rows import JobRow
from corral.store.sandboxes import SandboxRow
from tests.kit import internet as fake_internet
from tests.kit import postgres as kit_postgres
from tests.kit import processes
from tests.kit.build_cache import BuildCache
from tests.kit.connect import call
from tests.kit.http import CallbackReceiver
from tests.kit.polling import wait_until

if TYPE_CHECKING:
    from corral.images import Layer, LayerStore
    from corral.isolation import Engine, Sandbox
    from corral.jobs.callbacks import CallbackDispatcher
    from corral.sandboxes import SandboxManager

TEST_CGROUP_PARENT = "corral-test"
# The microvm tier's guest kernel, where `make setup` downloads it.
GUEST_KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"


# -- tiers: every test gets exactly one of unit, integration, acceptance ---------------------

TIERS = ("unit", "integration", "acceptance")
# Fixtures that bring up real engines, sandboxes, servers or kernel state: a test using any
# of them (directly or through another fixture) is an integration test. `settings` is the
# session's runtime dir for real engines and servers; unit tests use `store_settings`.
INTEGRATION_FIXTURES = frozenset(
    {
        "settings",
        "engine",
        "sandbox",
        "sandbox_host",
        "server",
        "own_runtime",
        "internet",
        "tier",
    }
)
# Markers that already say a test needs a real sandbox.
INTEGRATION_MARKERS = ("sandbox", "hostile")


def tier_of(item: pytest.Item) -> str:
    """An explicit tier marker wins (the nearest one: function over class over module);
    else a test is integration when it needs a sandbox or uses a fixture above; else unit."""
    for marker in item.iter_markers():
        if marker.name in TIERS:
            return marker.name
    if any(item.get_closest_marker(name) for name in INTEGRATION_MARKERS):
        return "integration"
    if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    return "unit"


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """No process a test spawned (through the kit) outlives it, even when it fails."""
    start = processes.mark()
    try:
        yield
    finally:
        processes.reap_since(start)


# Whether the host's own namespace forwards packets, when the session started. A sandbox
# uplink made in the host's namespace turns forwarding on and NATs the sandbox to the
# real network: tests must make networked sandboxes inside the fake internet
# (tests/kit/netdriver.py), never here.
_HOST_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")
_FORWARDING_AT_START = _HOST_FORWARDING.read_text().strip()


@pytest.fixture(autouse=True)
def _no_uplink_in_the_host_namespace() -> Iterator[None]:
    yield
    if _FORWARDING_AT_START == "0" and _HOST_FORWARDING.read_text().strip() != "0":
        _HOST_FORWARDING.write_text("0\n")
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("0\n")
        pytest.fail(
            "this test gave a sandbox an uplink in the host's own network namespace (it "
            "turned forwarding on): make networked sandboxes in the fake internet "
            "(tests/kit/netdriver.py), or ask a server without job workers"
        )


def pytest_configure(config: pytest.Config) -> None:
    # Started in the background by a shell without job control (a CI script's `cmd &`),
    # the suite inherits SIGINT ignored, and so would every process it starts: an ignored
    # signal stays ignored across exec, and Python then installs no KeyboardInterrupt.
    # The Ctrl-C tests send SIGINT to the CLI as a terminal does; it must arrive.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)
        mark_isolation_tier(item)


# -- isolation tiers: one test on every tier the host offers ---------------------------------

# The tiers a test marked `every_tier` (or using the `tier` fixture) runs on. `process` is
# left out: it isolates nothing, so the isolation tests would not hold on it.
ISOLATION_TIERS = ("namespace", "gvisor", "microvm")
# microvm boots under TCG on hosts without KVM (seconds a sandbox): `make test` runs only
# the tests marked `microvm_subset` on it; the rest are `slow` there (`make test-tiers`).
SLOW_TIERS = ("microvm",)

every_tier = pytest.mark.usefixtures("tier")


@functools.cache
def tier_unavailable(name: str, settings: Settings) -> str | None:
    """Why the isolation tier `name` cannot run here (its probe's answer), or None; asked
    once a session (a probe may start a process)."""
    from corral.isolation.registry import unavailable

    return unavailable(name, settings)


@pytest.fixture(params=ISOLATION_TIERS)
def tier(request: pytest.FixtureRequest, settings: Settings) -> str:
    """The isolation tier the test runs on: one run per tier; a tier the host lacks skips
    with its probe's reason."""
    name: str = request.param
    if reason := tier_unavailable(name, settings):
        pytest.skip(f"{name} tier unavailable here: {reason}")
    return name


def tier_param(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("tier") if callspec is not None else None


def mark_isolation_tier(item: pytest.Item) -> None:
    """A test run on every tier is `tiers` (`make test-tiers`); on a slow tier, it is also
    `slow` unless it is in that tier's subset (`microvm_subset`). A known gap of a tier
    (`@pytest.mark.fails_on(tier, reason=...)`) is an xfail there, not strict: the run's
    summary lists it (XPASS once the tier is fixed: then remove the mark)."""
    name = tier_param(item)
    if name is None:
        return
    item.add_marker("tiers")
    if name in SLOW_TIERS and not item.get_closest_marker(f"{name}_subset"):
        item.add_marker("slow")
    for gap in item.iter_markers("fails_on"):
        if name in gap.args:
            item.add_marker(
                pytest.mark.xfail(reason=f"{name}: {gap.kwargs['reason']}", strict=False)
            )


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    # Not under pytest's tmp_path: its parents are mode 0700, which the sandboxes' own
    # unprivileged uids could not traverse.
    runtime = Path(tempfile.mkdtemp(prefix="corral-test-"))
    session = Settings(
        data_dir=runtime / "data",
        runtime_dir=runtime,
        cgroup_parent=TEST_CGROUP_PARENT,
        allow_process_backend=True,
        base_template="off",  # never built from the internet: tests/kit/e2b_base.py installs it
        guest_kernel_dir=str(GUEST_KERNELS) if GUEST_KERNELS.is_dir() else "",
    )
    yield session
    from corral.isolation import Engine

    # Servers and workers the tests killed with SIGKILL left sandboxes (mounts, cgroups)
    # that only a later start in this runtime dir would reap: reap them now.
    Engine(session)
    shutil.rmtree(runtime, ignore_errors=True)


# -- the databases: SQLite, and PostgreSQL on a throwaway cluster -----------------------------

DATABASES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A unit test on the `store` runs on every database; so does a test using `database`,
    and a test marked `every_database` (its `store` and the session's `server`)."""
    definition = metafunc.definition
    if definition.get_closest_marker("sqlite_only"):
        return
    names = set(metafunc.fixturenames)
    on_every = definition.get_closest_marker("every_database") is not None
    # Not with `tier` too: such a test's subject is the isolation tier, and tiers times
    # databases would multiply the slowest tests for nothing.
    if on_every and "server" in names and "tier" not in names:
        # Module scope: the module's tests are grouped by database, so what its fixtures
        # make on `server` (a sandbox, a team) is made once per database, not per test.
        metafunc.parametrize("server", DATABASES, indirect=True, scope="module")
        return
    store_level = "store" in names and not INTEGRATION_FIXTURES & names
    used = [m.args for m in definition.iter_markers("usefixtures")]
    asks = "database" in inspect.signature(metafunc.function).parameters or any(
        "database" in args for args in used
    )
    if any("database" in m.args[0] for m in definition.iter_markers("parametrize")):
        return  # the test picks its databases itself
    if "database" in names and (store_level or asks or on_every):
        metafunc.parametrize("database", DATABASES, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[kit_postgres.Cluster]:
    """The session's PostgreSQL cluster, its template database migrated to the head."""
    if reason := kit_postgres.unavailable():
        pytest.skip(reason)
    try:
        cluster = kit_postgres.start()
    except kit_postgres.ClusterFailed as exc:
        pytest.skip(f"PostgreSQL's throwaway cluster did not start: {exc}")
    try:
        migrated = Store.open(
            Settings(data_dir=Path("/nonexistent")), url=cluster.url(kit_postgres.MIGRATED)
        )
        migrated.close()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test's database URL: "" (SQLite in its data dir) unless the test runs on
    PostgreSQL (`DATABASES`), then a fresh database, migrated, of its own."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield ""
        return
    cluster: kit_postgres.Cluster = request.getfixturevalue("postgres")
    with cluster.database(template=kit_postgres.MIGRATED) as url:
        yield url


@pytest.fixture
def store_settings(tmp_path: Path, database: str) -> Settings:
    """Settings of a store of its own, for store tests: SQLite in the test's tmp_path, or
    the test's PostgreSQL database when it runs on that (`database`)."""
    return Settings(
        data_dir=tmp_path / "data",
        runtime_dir=tmp_path / "run",
        base_template="off",
        database_url=database,
    )


@pytest.fixture
def store(store_settings: Settings) -> Iterator[Store]:
    store = Store.open(store_settings)
    yield store
    store.close()


# The tests' callback receivers are on loopback, which only an operator's allowlist lets
# callbacks reach.
LOOPBACK_ALLOW = "127.0.0.1"


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """A callback receiver on loopback that takes every POST (see its knobs)."""
    receiver = CallbackReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
async def dispatchers(store: Store) -> AsyncIterator[Callable[..., CallbackDispatcher]]:
    """Makes callback dispatchers on `store`: fast retries, the loopback allowlist unless
    given a policy; all are closed at the end."""
    from corral.jobs.callback_policy import CallbackPolicy
    from corral.jobs.callbacks import CallbackDispatcher

    made: list[CallbackDispatcher] = []

    def make(policy: CallbackPolicy | None = None, **options: Any) -> CallbackDispatcher:
        fast = {"interval": 0.01, "backoff": 0.001, "max_backoff": 0.01}
        options = {**fast, "timeout": 5.0, "hold": 10.0, **options}
        policy = policy or CallbackPolicy.parse(LOOPBACK_ALLOW)
        dispatcher = CallbackDispatcher(store, policy, **options)
        made.append(dispatcher)
        return dispatcher

    try:
        yield make
    finally:
        for dispatcher in made:
            await dispatcher.aclose()


def require_backend(settings: Settings, name: str) -> None:
    from corral.isolation.registry import backend_class

    caps = backend_class(name).probe(settings)
    if not caps.available:
        pytest.skip(f"{name} backend unavailable here: {'; '.join(caps.missing)}")


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    from corral.isolation import Engine

    engine = Engine(settings)
    try:
        yield engine
    finally:
        await engine.aclose()


def unmet(marks: list[pytest.MarkDecorator]) -> str | None:
    """The reason of the first skipif mark whose condition holds (tests/kit/debian.py's
    `needs_archive`), or None."""
    return next((str(m.kwargs["reason"]) for m in marks if m.args[0]), None)


def base_unavailable() -> str | None:
    """Why this host cannot give a server the `base` template (tests/kit/e2b_base.py)."""
    from tests.kit.e2b_base import needs_base

    return unmet(needs_base())


def has_host_template(tier: str) -> bool:
    """Whether `tier` runs sandboxes of the `host` template (all three isolation tiers do
    now; a tier that cannot takes a layer template)."""
    from corral.isolation.registry import backend_class

    return backend_class(tier).host_template


@pytest.fixture
def tier_template(request: pytest.FixtureRequest, engine: Engine) -> str:
    """The template an engine sandbox of the test's tier starts from: `host`, or on a tier
    without it the Debian base, added to `engine` as `debian`."""
    if has_host_template(isolation_of(request)):
        return "host"
    from tests.kit.debian import needs_archive

    if reason := unmet(needs_archive("python3")):
        pytest.skip(reason)
    store, layer = request.getfixturevalue("debian_base")
    engine.templates.add("debian", store, [layer.digest])
    return "debian"


def server_template(tier: str) -> str:
    """The template a sandbox of the session's server on `tier` starts from: `host`, or
    on a tier without it the server's `base` (skips, saying why, where it has none)."""
    if has_host_template(tier):
        return "host"
    if reason := base_unavailable():
        pytest.skip(reason)
    return "base"


def isolation_of(request: pytest.FixtureRequest) -> str:
    """The tier a fixture's sandbox runs on: the test's `tier` when it runs on every tier
    (`every_tier`), else namespace."""
    if "tier" in request.fixturenames:
        name: str = request.getfixturevalue("tier")
        return name
    return "namespace"


@pytest.fixture
async def sandbox(
    engine: Engine, settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[Sandbox]:
    """A sandbox with default limits, on the test's tier (`isolation_of`)."""
    isolation = isolation_of(request)
    require_backend(settings, isolation)
    template = request.getfixturevalue("tier_template")
    box = await engine.create(template, isolation=isolation)
    try:
        yield box
    finally:
        await box.destroy()


def cgroup_dirs(sandbox_id: str) -> list[Path]:
    """The sandbox's cgroup directories, one a hierarchy (v1) or the one (v2)."""
    # Not a recursive glob: it would walk other tests' cgroups, which vanish under it.
    root = Path("/sys/fs/cgroup")
    return [d for top in ("", "*/") for d in root.glob(f"{top}{TEST_CGROUP_PARENT}/{sandbox_id}")]


def host_processes_of_uid(uid: int, count: int = 1) -> list[int]:
    """Live host processes running as `uid` (or any of the `count` ids from it: a
    sandbox's range, see `slot_ids`).

    Zombies are left out: they are dead and hold nothing but a pid. After a host process is
    SIGKILLed its sandboxes' dead processes are re-parented to the host's pid 1, whose job
    it is to reap them (this CI machine's pid 1 does not).
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if not uid <= os.stat(f"/proc/{entry}").st_uid < uid + count:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if state != b"Z":
                found.append(int(entry))
    return found


def holds_slot(record: dict[str, Any], kind: str) -> bool:
    """Whether the sandbox of footprint `record` still holds its `kind` slot ("uid" or
    "net"): the slot's entry names its footprint (another sandbox may have it by now)."""
    from corral.isolation.footprint import slot_holder

    entry = Path(record[f"{kind}_slots_dir"]) / str(record[f"{kind}_slot"])
    return slot_holder(entry) == str(Path(record["path"]).absolute())


def slot_ids(settings: Settings, slot: int | str) -> tuple[int, int]:
    """The host ids of uid slot `slot`, as (first, count) for `host_processes_of_uid`."""
    from corral.config import IDS_PER_SLOT
    from corral.isolation.idrange import first_id

    return first_id(settings, int(slot)), IDS_PER_SLOT


@pytest.fixture(scope="session")
def debian_base(settings: Settings) -> tuple[LayerStore, Layer]:
    """The layer store of the session's engines and a Debian base with python3 in it (a
    cached offline bootstrap: tests/kit/debian.py). Tests using it mark themselves with
    `needs_archive("python3")`."""
    from corral.images import LayerStore
    from tests.kit.debian import base_layer

    store = LayerStore(settings.data_dir / "templates")
    return store, base_layer(store, ["python3"])


@pytest.fixture
def engine_debian(
    engine: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> Engine:
    """The engine with the Debian base as the templates `debian` (commands run as the
    default user) and `debian-root` (as root inside)."""
    require_backend(settings, "namespace")
    store, layer = debian_base
    engine.templates.add("debian", store, [layer.digest])
    engine.templates.add("debian-root", store, [layer.digest], user="root")
    return engine


@pytest.fixture(scope="session")
def internet() -> Iterator[fake_internet.Internet]:
    """The session's fake internet (tests/kit/internet.py); skipped with the reason when
    this host cannot build one."""
    if reason := fake_internet.unavailable():
        pytest.skip(reason)
    yield from fake_internet.fake_internet()


# -- a real API server, as a subprocess ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A `corral server` process on a free port, with its own data directory."""

    url: str
    key: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def corral(
        self,
        *args: str,
        timeout: float = 60,
        input: str | None = None,
        stdin: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        **more_env: str,
    ) -> subprocess.CompletedProcess[str]:
        """The `corral` CLI as a subprocess, pointed at this server with its default key,
        its environment changed by `env` and `more_env`.

        Its stdin is `input`, or the `stdin` file, or else empty (/dev/null): `run` and
        `exec` pass a stdin that is not a terminal on to the command.
        """
        return subprocess.run(
            [sys.executable, "-m", "corral.cli", *args],
            capture_output=True,
            text=True,
            env={
                **self.env,
                "CORRAL_SERVER": self.url,
                "CORRAL_API_KEY": self.key,
                **(env or {}),
                **more_env,
            },
            timeout=timeout,
            input=input,
            stdin=subprocess.DEVNULL if input is None and stdin is None else stdin,
        )

    def cli_process(self, *args: str) -> subprocess.Popen[str]:
        """The `corral` CLI started in the background (a follower, a run to interrupt),
        pointed at this server, its output in text pipes; reaped after the test."""
        return processes.spawn(
            [sys.executable, "-m", "corral.cli", *args],
            env={**self.env, "CORRAL_SERVER": self.url, "CORRAL_API_KEY": self.key},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def store(self) -> Store:
        """This server's store, opened beside it: SQLite in its data dir, or its
        PostgreSQL database (CORRAL_DATABASE_URL). The caller closes it."""
        url = self.env.get("CORRAL_DATABASE_URL", "")
        return Store.open(Settings(data_dir=self.data_dir, database_url=url))

    def new_team(self, name: str) -> str:
        """Create a team in this server's store; its new API key."""
        done = self.corral("admin", "team", "create", name)
        assert done.returncode == 0, done.stderr
        done = self.corral("admin", "key", "create", "--team", name)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return processes.stop(self.process, sig, timeout)


def opts(server: LiveServer) -> dict[str, Any]:
    """The SDK's options to reach `server` with its default key."""
    return {"server": server.url, "api_key": server.key}


def start_server(
    settings: Settings,
    data_dir: Path,
    *,
    pool_size: int = 2,
    extra_env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    ca_file: Path | None = None,
    ready_timeout: float = 30,
) -> LiveServer:
    """A `corral server` on a free port; `extra_env` adds settings (e.g. CORRAL_JOB_LEASE),
    `args` options; with `ca_file` (which the server may write: --tls-self-signed) it
    serves HTTPS and is reached through that CA."""
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data_dir),
        "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
        "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
        "CORRAL_ALLOW_PROCESS_BACKEND": "1",
        "CORRAL_CONFIG": str(data_dir.parent / f"config-{port}"),  # never ~/.corral
        "CORRAL_POOL_SIZE": str(pool_size),
        "CORRAL_BASE_TEMPLATE": "off",  # tests/kit/e2b_base.py installs it, offline
        "CORRAL_GUEST_KERNEL_DIR": settings.guest_kernel_dir,
        **(extra_env or {}),
    }
    for name in ("CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT"):
        env.pop(name, None)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"server-{port}.log"
    process = serve(port, env, log, args, ca_file, ready_timeout)
    key = (data_dir / "default.key").read_text().strip()
    scheme = "http" if ca_file is None else "https"
    return LiveServer(f"{scheme}://127.0.0.1:{port}", key, data_dir, env, process, log)


def serve(
    port: int,
    env: Mapping[str, str],
    log: Path,
    args: tuple[str, ...] = (),
    ca_file: Path | None = None,
    ready_timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """`corral server --port port` with `env`, its output appended to `log`, once it answers
    /healthz (also how a test restarts a server on the same address); over HTTPS, verified
    with `ca_file`, if given."""
    with log.open("ab") as sink:
        process = processes.spawn(
            [sys.executable, "-m", "corral.cli", "server", "--port", str(port), *args],
            env=env,
            stdout=sink,
            stderr=sink,
        )

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"corral server exited {process.returncode}: {log.read_text()}")
        try:
            if ca_file is None:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            else:
                if not ca_file.exists():  # a self-signed server writes it as it starts
                    return False
                tls = ssl.create_default_context(cafile=ca_file)
                reply = httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=1, verify=tls)
            return reply.status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answering, "the corral server to answer /healthz", timeout=ready_timeout)
    except AssertionError as error:
        processes.stop(process, signal.SIGKILL)
        raise RuntimeError(f"{error}: {log.read_text()}") from None
    return process


@dataclass
class LiveWorker:
    """A `corral worker` process on a server's store."""

    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return processes.stop(self.process, sig, timeout)


def start_worker(server: LiveServer, **extra_env: str) -> LiveWorker:
    """`corral worker` with the server's environment (plus `extra_env`), once it runs."""
    env = {**server.env, **extra_env}
    log = server.data_dir.parent / f"worker-{secrets.token_hex(4)}.log"
    with log.open("ab") as sink:
        process = processes.spawn(
            [sys.executable, "-m", "corral.cli", "worker"], env=env, stdout=sink, stderr=sink
        )

    def started() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"corral worker exited {process.returncode}: {log.read_text()}")
        return "job worker started" in log.read_text()

    try:
        wait_until(started, "the corral worker to start")
    except AssertionError as error:
        processes.stop(process, signal.SIGKILL)
        raise RuntimeError(f"{error}: {log.read_text()}") from None
    return LiveWorker(process, log)


def session_server(settings: Settings, name: str, database_url: str = "") -> LiveServer:
    """A server for the session, data under `name`, its store at `database_url` (else
    SQLite in its data dir). Its callbacks may go to receivers on loopback (the tests'),
    which a server refuses by default."""
    env = {"CORRAL_CALLBACK_ALLOW": "127.0.0.1", "CORRAL_DATABASE_URL": database_url}
    data = settings.runtime_dir / name
    if base_unavailable() is None:  # `base`: a tier without the host template starts from it
        from tests.kit import e2b_base

        e2b_base.install(data)
    return start_server(settings, data, extra_env=env)


@pytest.fixture(scope="session")
def sqlite_server(settings: Settings) -> Iterator[LiveServer]:
    """The session's server on SQLite (tests take it as `server`)."""
    live = session_server(settings, "server-data")
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def pg_server(settings: Settings, postgres: kit_postgres.Cluster) -> Iterator[LiveServer]:
    """`sqlite_server`'s twin on PostgreSQL: a database of its own on the session's cluster
    (tests marked `every_database` take it as `server`)."""
    with postgres.database(template=kit_postgres.MIGRATED) as url:
        live = session_server(settings, "pg-server-data", url)
        try:
            yield live
        finally:
            live.stop()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> LiveServer:
    """One server for the session, on SQLite; a test marked `every_database` runs on each
    database in turn (`pg_server` too). Each is started once a session: choosing one is
    free. Tests that stop servers start their own."""
    on = getattr(request, "param", "sqlite")
    live: LiveServer = request.getfixturevalue(
        "pg_server" if on == "postgresql" else "sqlite_server"
    )
    return live


@pytest.fixture(scope="module")
def build_cache() -> BuildCache:
    """What a module's template-building servers built, for the next one it starts (on
    another database): each template is built once a module (tests/kit/build_cache.py)."""
    return BuildCache()


def database_url(request: pytest.FixtureRequest) -> str:
    """For a fixture parametrized over DATABASES that starts its own server: "" (SQLite in
    its data dir) or a fresh database on the session's cluster, dropped after the test."""
    if request.param == "sqlite":
        return ""
    cluster: kit_postgres.Cluster = request.getfixturevalue("postgres")
    name = cluster.create_database(template=kit_postgres.MIGRATED)
    request.addfinalizer(lambda: cluster.drop_database(name))
    return cluster.url(name)


@pytest.fixture
def box(server: LiveServer, sandbox_host: None, request: pytest.FixtureRequest) -> Iterator[str]:
    """A sandbox on the session's server, created and killed over the raw API, on the
    test's tier (`isolation_of`): its id."""
    isolation = isolation_of(request)
    asked = {"timeoutSeconds": 120, "isolation": isolation, "template": server_template(isolation)}
    response = call(server, "Create", asked)
    assert response.status_code == 200, response.text
    sandbox_id: str = response.json()["sandbox"]["id"]
    yield sandbox_id
    call(server, "Kill", {"sandboxId": sandbox_id})


@contextmanager
def private_runtime(settings: Settings) -> Iterator[Settings]:
    """`settings` with a runtime dir of its own: the host's admission counts every sandbox
    of a runtime dir, so those of the session's server (its warm pool) would count too."""
    runtime = Path(tempfile.mkdtemp(prefix="corral-test-"))
    yield settings.with_(runtime_dir=runtime, data_dir=runtime / "data")
    from corral.isolation import Engine

    Engine(settings.with_(runtime_dir=runtime))  # reaps what killed processes left
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def own_runtime(settings: Settings) -> Iterator[Settings]:
    with private_runtime(settings) as own:
        yield own


@pytest.fixture
def msettings(own_runtime: Settings, store_settings: Settings) -> Settings:
    """Settings for the test's own SandboxManagers: a private runtime dir (the host's
    admission counts every sandbox of one), the data dir and database of `store`; skips
    (saying why) where the host cannot run namespace sandboxes."""
    require_backend(own_runtime, "namespace")
    return own_runtime.with_(
        data_dir=store_settings.data_dir, database_url=store_settings.database_url
    )


StartManager = Callable[..., Awaitable["SandboxManager"]]


@pytest.fixture
async def managers(msettings: Settings, store: Store) -> AsyncIterator[StartManager]:
    """Starts SandboxManagers on `store` (`msettings` unless given settings; no warm pool
    and fast ticks unless given options); all are closed at the end."""
    from corral.sandboxes import SandboxManager

    started: list[SandboxManager] = []

    async def start(settings: Settings | None = None, **options: Any) -> SandboxManager:
        options = {"pool_size": 0, "tick": 0.1, "metrics_interval": 0.1, **options}
        manager = SandboxManager(settings or msettings, store, **options)
        await manager.start()
        started.append(manager)
        return manager

    try:
        yield start
    finally:
        for manager in started:
            await manager.aclose()


def overcommit_for(settings: Settings, capacity_mib: int) -> float:
    """The CORRAL_MEMORY_OVERCOMMIT under which this host admits about `capacity_mib` of
    sandbox memory (a tiny host, whatever this machine's memory)."""
    return capacity_mib / (host_memory_mib() - settings.memory_reserve_mib)


def tiny_host(settings: Settings, capacity_mib: int) -> Settings:
    """`settings` on a host that admits about `capacity_mib` of sandbox memory."""
    return settings.with_(memory_overcommit=overcommit_for(settings, capacity_mib))


# Room for one job's sandbox of 512 MiB (the default job limit), not two, and one of 128
# MiB beside it.
ONE_JOB_MIB = 700


@pytest.fixture
def tiny(own_runtime: Settings) -> Settings:
    """A private runtime on a host with room for one sandbox of 512 MiB, not two (see
    ONE_JOB_MIB); skips where the host cannot run namespace sandboxes."""
    require_backend(own_runtime, "namespace")
    return tiny_host(own_runtime, ONE_JOB_MIB)


@pytest.fixture
def sandbox_host(settings: Settings) -> None:
    """Skip (saying why) where the host cannot run namespace sandboxes."""
    require_backend(settings, "namespace")


def new_sandbox_row(team: Team, **changes: Any) -> SandboxRow:
    """A running sandbox row as the store keeps it (default limits, owned by no live
    process), for tests of the store's sandbox rows and quotas."""
    now = datetime.now(UTC)
    row = SandboxRow(
        id="sb_" + secrets.token_hex(10),
        team_id=team.id,
        template="host",
        isolation="namespace",
        state="running",
        state_reason="created",
        metadata={},
        limits=asdict(Limits()),
        envs={},
        timeout_seconds=300,
        expires_at=now + timedelta(seconds=300),
        idle_timeout_seconds=0,
        on_idle="pause",
        created_at=now,
        updated_at=now,
        last_activity_at=now,
        owner_host="test",
        owner_pid=1,
        owner_start=0,
    )
    return replace(row, **changes)


def new_job_row(team: Team, **changes: Any) -> JobRow:
    """A queued job row as the store keeps it, for tests of the store's job queue."""
    row = JobRow.queued(
        id="j" + uuid.uuid4().hex[:20],
        team_id=team.id,
        kind="command",
        template="host",
        isolation="auto",
        memory_mib=512,
        spec={"kind": "command", "command": ["true"]},
        labels={},
        priority=0,
        max_attempts=1,
        now=datetime.now(UTC),
    )
    return replace(row, **changes)

"""A real Corral server for the official `e2b` SDK: the one launcher that this directory's
conftest, scripts/e2b_conformance.py and benchmarks/e2b.py all start their server with.

It runs in the E2B environment (tests/e2b_sdk's own venv), which cannot import `corral`
(see pyproject.toml), so it drives the main venv's `corral` CLI as subprocesses and uses
the standard library only. The server is root's `corral server` on a free loopback port,
with a data and runtime directory of its own (under /tmp: the sandboxes' unprivileged uids
must be able to traverse it), the `base` template (E2B's default) installed from the local
Debian archive (`make setup`) so that no test reaches the network, and an `e2b_` key.

Nothing here may reach a real address (E2B's own tests curl 1.1.1.1 and 8.8.8.8 from their
sandboxes, expecting a deny rule to stop them): `isolate_network()` moves the caller into a
network namespace of its own whose only interface is loopback, before it starts the server,
and `start` refuses to run anywhere else. The server, its sandboxes' uplinks and the SDK
all live in that namespace, where every address but loopback is unreachable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORRAL = ROOT / ".venv" / "bin" / "corral"
CORRAL_PYTHON = ROOT / ".venv" / "bin" / "python"
# `make setup`'s offline Debian archive (tests/kit/debian.py reads the same variable).
ARCHIVE = Path(os.environ.get("CORRAL_TEST_DEBIAN_ARCHIVE") or ROOT / ".cache" / "debian")
CGROUP_PARENT = "corral-e2b-test"
STARTUP_SECONDS = 120.0


@dataclass
class CorralServer:
    """A running `corral server` and what a client needs to reach it."""

    url: str
    key: str
    runtime: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def e2b_env(self) -> dict[str, str]:
        """The environment that points the unmodified `e2b` SDK at this server: REST and
        envd share its one port; the key is E2B-shaped (`e2b_<hex>`)."""
        return {
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_API_KEY": self.key,
            "E2B_DOMAIN": "localhost",  # never e2b.app: nothing may reach E2B's cloud
        }

    def corral(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The main venv's `corral` CLI pointed at this server with its key."""
        return subprocess.run(
            [str(CORRAL), *args],
            env={**self.env, "CORRAL_SERVER": self.url, "CORRAL_API_KEY": self.default_key},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    @property
    def default_key(self) -> str:
        """The default team's Corral key (the server writes it on first start)."""
        return (self.runtime / "data" / "default.key").read_text().strip()

    def stop(self, timeout: float = 60) -> None:
        """Stop the server (SIGTERM, then SIGKILL), reap whatever sandboxes it left and
        remove its directories."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _reap(self.runtime, self.env)


CLONE_NEWNET = 0x40000000


def isolate_network() -> None:
    """Move this process, and every process it starts from now on, into a new network
    namespace with loopback only (as root; before any thread starts: a namespace change
    moves the calling thread alone)."""
    if threading.active_count() != 1:
        raise RuntimeError("isolate_network() must run before any thread starts")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare(CLONE_NEWNET): {os.strerror(error)} (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it when its parent dies, so a test session
    killed outright (SIGKILL, a CI timeout) does not leave a server and its sandboxes."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _isolated() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(*, pool_size: int = 2, extra_env: Mapping[str, str] | None = None) -> CorralServer:
    """A `corral server` on a free loopback port, answering, with its `base` template ready
    and a key for the E2B SDK."""
    if not _isolated():
        raise RuntimeError(
            "this process can reach networks other than loopback: call "
            "corral_server.isolate_network() first (nothing here may reach a real address)"
        )
    if not CORRAL.exists():
        raise RuntimeError(f"{CORRAL} is missing: run `make setup` (uv sync) at {ROOT} first")
    runtime = Path(tempfile.mkdtemp(prefix="corral-e2b-"))
    runtime.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(runtime / "data"),
        "CORRAL_RUNTIME_DIR": str(runtime),
        "CORRAL_CGROUP_PARENT": CGROUP_PARENT,
        "CORRAL_CONFIG": str(runtime / "config"),  # never ~/.corral
        "CORRAL_POOL_SIZE": str(pool_size),
        "CORRAL_HOST": "127.0.0.1",
        "CORRAL_DEBIAN_MIRROR": f"deb [trusted=yes] copy://{ARCHIVE} ./",
        "CORRAL_BASE_TEMPLATE": "off",  # installed below, offline
        **(extra_env or {}),
    }
    for name in ("CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT", "VIRTUAL_ENV"):
        env.pop(name, None)
    try:
        _install_base(runtime / "data", env)
    except BaseException:
        shutil.rmtree(runtime, ignore_errors=True)  # nothing ran there: no mount, no sandbox
        raise
    log = runtime / "server.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [str(CORRAL), "server", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    server = CorralServer(url, "", runtime, env, process, log)
    try:
        _wait_answering(server)
        server.key = _e2b_key(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running(
    *, pool_size: int = 2, extra_env: Mapping[str, str] | None = None
) -> Iterator[CorralServer]:
    server = start(pool_size=pool_size, extra_env=extra_env)
    try:
        yield server
    finally:
        server.stop()


def _wait_answering(server: CorralServer) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"corral server exited {server.process.returncode}: {server.log.read_text()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"corral server did not answer in {STARTUP_SECONDS}s: {server.log}")


def _install_base(data_dir: Path, env: Mapping[str, str]) -> None:
    """The server's `base` template (E2B's default), installed before it starts from the
    tar tests/kit/e2b_base.py bootstraps once from the local Debian archive (seconds when
    cached): the server itself never builds it (CORRAL_BASE_TEMPLATE=off)."""
    if not (ARCHIVE / "Release").is_file():
        raise RuntimeError(f"no local Debian archive at {ARCHIVE}: run `make setup` as root")
    installed = subprocess.run(
        [
            str(CORRAL_PYTHON),
            "-c",
            "import sys; from pathlib import Path; from tests.kit.e2b_base import install; "
            "install(Path(sys.argv[1]))",
            str(data_dir),
        ],
        cwd=ROOT,
        env={**env, "CORRAL_TEST_DEBIAN_ARCHIVE": str(ARCHIVE)},
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if installed.returncode != 0:
        raise RuntimeError(
            f"installing the base template from {ARCHIVE} failed (its packages must be in "
            "the archive: run `make setup` as root, or point CORRAL_TEST_DEBIAN_ARCHIVE at "
            f"an archive scripts/debian_archive.sh made):\n{installed.stderr[-3000:]}"
        )


def _e2b_key(server: CorralServer) -> str:
    """A key in E2B's `e2b_<hex>` shape for the default team, as a user would make one."""
    created = subprocess.run(
        [str(CORRAL), "admin", "key", "create", "--team", "default", "--e2b"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if created.returncode != 0:
        raise RuntimeError(f"corral admin key create --e2b failed: {created.stderr}")
    return created.stdout.strip().splitlines()[-1]


def _reap(runtime: Path, env: Mapping[str, str]) -> None:
    """Reap sandboxes a killed server left in `runtime` (the engine does that when it
    starts on a runtime dir), then remove the directory, unless something is still mounted
    under it: removing through a leftover mount could reach the files it shows."""
    subprocess.run(
        [
            str(CORRAL_PYTHON),
            "-c",
            "import sys; from pathlib import Path; from corral.config import Settings; "
            "from corral.isolation import Engine; "
            "Engine(Settings(data_dir=Path(sys.argv[1]) / 'data', runtime_dir=Path(sys.argv[1]),"
            " cgroup_parent=sys.argv[2]))",
            str(runtime),
            CGROUP_PARENT,
        ],
        env=dict(env),
        capture_output=True,
        timeout=120,
        check=False,
    )
    mounts = Path("/proc/self/mountinfo").read_text().split("\n")
    if any(f" {runtime}/" in line or f" {runtime} " in line for line in mounts):
        print(f"corral_server: {runtime} still has mounts; left in place")
        return
    shutil.rmtree(runtime, ignore_errors=True)

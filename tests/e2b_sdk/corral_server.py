"""A real Corral server for the official `e2b` SDK: the one launcher that this directory's
conftest, scripts/e2b_conformance.py and benchmarks/e2b.py all start their server with.

It runs in the E2B environment (tests/e2b_sdk's own venv), which cannot import `corral`
(see pyproject.toml), so it drives the main venv's `corral` CLI as subprocesses and uses
the standard library only. The server is root's `corral server` on a free loopback port,
with a data and runtime directory of its own (under /tmp: the sandboxes' unprivileged uids
must be able to traverse it), and a `base` template, E2B's default, made from the local
Debian archive (`make setup`) so that no test reaches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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
# What the `base` template holds: what E2B's base image offers that its tests use.
BASE_PACKAGES = ("python3",)


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
        envd share its one port. The SDK checks a key's format (`e2b_<hex>`) before any
        request; a Corral key of another shape needs that check turned off."""
        env = {
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_API_KEY": self.key,
            "E2B_DOMAIN": "localhost",  # never e2b.app: nothing may reach E2B's cloud
        }
        if not self.key.startswith("e2b_"):
            env["E2B_VALIDATE_API_KEY"] = "false"
        return env

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(*, pool_size: int = 2, extra_env: Mapping[str, str] | None = None) -> CorralServer:
    """A `corral server` on a free loopback port, answering, with its `base` template ready
    and a key for the E2B SDK."""
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
        **(extra_env or {}),
    }
    for name in ("CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT", "VIRTUAL_ENV"):
        env.pop(name, None)
    log = runtime / "server.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [str(CORRAL), "server", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    server = CorralServer(url, "", runtime, env, process, log)
    try:
        _wait_answering(server)
        _ensure_base(server)
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


def _ensure_base(server: CorralServer) -> None:
    """The `base` template, built once per server from the local Debian archive."""
    if not (ARCHIVE / "Release").is_file():
        raise RuntimeError(f"no local Debian archive at {ARCHIVE}: run `make setup` as root")
    listed = server.corral("template", "list", "-o", "json")
    if listed.returncode == 0 and any(
        item.get("name") == "base" and item.get("state") in ("ready", "READY")
        for item in _json_items(listed.stdout)
    ):
        return
    packages = [arg for package in BASE_PACKAGES for arg in ("--package", package)]
    built = server.corral("template", "build", "base", "--debian", _suite(), *packages)
    if built.returncode != 0:
        raise RuntimeError(f"building the base template failed:\n{built.stdout}{built.stderr}")


def _e2b_key(server: CorralServer) -> str:
    """A key in E2B's `e2b_<hex>` shape for the default team when the server issues them
    (`corral admin key create --e2b`), else the default Corral key."""
    created = subprocess.run(
        [str(CORRAL), "admin", "key", "create", "--team", "default", "--e2b"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if created.returncode == 0 and created.stdout.strip():
        return created.stdout.strip().splitlines()[-1]
    return server.default_key


def _json_items(text: str) -> list[dict[str, object]]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    if isinstance(parsed, dict):
        parsed = next((value for value in parsed.values() if isinstance(value, list)), [])
    return [item for item in parsed if isinstance(item, dict)]


def _suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"{ARCHIVE}/Release names no codename")


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

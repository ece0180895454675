"""A tier's first probe (gvisor's kvm trial takes up to 2 s here) runs off the server's
event loop: the server answers requests while it runs.

The probe is held open by a fake `runsc` first on the server's PATH, whose `--version`
(the probe's first question) waits for a gate file that the test opens only after the
server has answered; the fake notes whether it saw the gate before it gave up. A server
that probes on its event loop cannot answer until the fake gives up, so the fake never
sees the gate: an ordering of events, not a timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from corral.config import Settings
from tests.conftest import start_server
from tests.kit.connect import call
from tests.kit.polling import wait_until

# The fake's longest wait for the gate (runsc's --version is given 10 s by the probe).
_WAIT = 8.0

FAKE_RUNSC = f"""#!{sys.executable}
import pathlib, sys, time
here = pathlib.Path(__file__).parent
if sys.argv[1:] == ["--version"]:
    (here / "probe-started").touch()
    deadline = time.monotonic() + {_WAIT}
    while time.monotonic() < deadline:
        if (here / "gate").exists():
            (here / "saw-gate").touch()
            break
        time.sleep(0.02)
    print("runsc version fake")
elif sys.argv[1:] == ["help", "platforms"]:
    print("ptrace")
elif sys.argv[-2:] != ["do", "true"]:
    sys.exit("this fake runsc runs no sandbox")
"""


def test_the_server_answers_while_a_tier_probe_runs(settings: Settings, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    runsc = fake / "runsc"
    runsc.write_text(FAKE_RUNSC)
    runsc.chmod(0o755)
    env = {"PATH": f"{fake}:{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    server = start_server(settings, tmp_path / "data", pool_size=0, extra_env=env)
    try:
        wait_until(lambda: (fake / "probe-started").exists(), "the server to probe its tiers")
        # Answered by the event loop, while the probe waits for the gate.
        assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
        listed = call(server, "List", {})  # an API call: auth, the store
        assert listed.status_code == 200, listed.text
        (fake / "gate").touch()
        wait_until(lambda: not _fake_running(runsc), "the probe to end", timeout=_WAIT + 10)
        assert (fake / "saw-gate").exists(), "the server answered only after the probe"
    finally:
        server.stop()


def _fake_running(runsc: Path) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(runsc).encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False

"""The sync SDK leaves nothing on stderr at interpreter exit, after streams of every kind.

Each command's output is an RPC stream; one left open (a command that ended, a background
command nobody waited for) used to be closed by the loop at exit, out of its task, which
printed "an error occurred during closing of asynchronous generator" (issue 10, item 4).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.usefixtures("sandbox_host")

SCRIPT = """
import sys
from corral import Sandbox

sbx = Sandbox.create(server=sys.argv[1], api_key=sys.argv[2], timeout=60)
assert sbx.commands.run("echo hi").stdout == "hi\\n"
killed = sbx.commands.run("sleep 30", background=True)
assert killed.kill().reason == "killed"
fed = sbx.commands.run("cat", background=True)
fed.send_stdin("fed\\n")
fed.close_stdin()
assert fed.wait().stdout == "fed\\n"
sbx.commands.run("cat", background=True).send_stdin("never waited for\\n")
other = sbx.commands.run("sleep 30", background=True)
sbx.commands.kill(other.pid)
sbx.commands.run("sleep 30", background=True)  # still running when the script ends
sbx.kill()
"""

RUNS = 8  # the traceback came every run; the loop catches one that comes sometimes


def test_sync_sdk_exits_without_output_after_background_stdin_and_kill(
    server: LiveServer,
) -> None:
    for run in range(RUNS):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, server.url, server.key],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (run, done.returncode, done.stderr) == (run, 0, "")

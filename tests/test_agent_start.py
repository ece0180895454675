"""How the guest agent starts: what its interpreter may import, on every tier.

The agent runs as the sandbox's root and holds the host's stream, while the sandbox's
user writes its working directory (/workspace). A module of the standard library the
agent imports late (`termios` at the first terminal, `traceback` at an internal error)
must come from the standard library, never from a file planted there: the agent's
interpreter runs isolated (`-I`), with no working directory on its module path.
"""

from __future__ import annotations

from corral.isolation import Sandbox
from corral.terminal import PtySize
from tests.conftest import every_tier

# A stand-in for the standard library's `termios`, which the agent imports at the first
# command on a terminal: if the agent imports it, it leaves a mark and the terminal fails.
PLANTED = "open('/tmp/planted', 'w').write('imported by the agent')\nraise SystemExit(9)\n"


@every_tier
async def test_a_module_planted_in_the_workdir_is_not_imported_by_the_agent(
    sandbox: Sandbox,
) -> None:
    planted = await sandbox.run(["sh", "-c", f"cat > termios.py <<'EOF'\n{PLANTED}EOF\npwd"])
    assert planted.ok, planted
    workdir = planted.stdout.decode().strip()
    command = await sandbox.exec(["sh", "-c", "echo on a terminal"], pty=PtySize(80, 24))
    result = await command.collect()
    assert result.ok and b"on a terminal" in result.stdout, result
    mark = await sandbox.run(["sh", "-c", "cat /tmp/planted 2>&1 || true"])
    assert b"imported" not in mark.stdout, f"the agent imported {workdir}/termios.py"

"""The guest agent as a sandbox gets it: its installed files and the standard library only.

The agent is several modules (`corral.guest.AGENT_FILES`); a sandbox has only the copies
`install_agent` makes, never the `corral` package. A module the agent imports but the
install leaves out would pass tests that run the agent from the source tree and fail in
every sandbox: here the installed copy runs on its own and serves each kind of call.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from corral.guest import AGENT_FILES, GuestConnection
from corral.isolation.agent_install import agent_command, install_agent

PYTHON = "/usr/bin/python3"


async def test_the_installed_agent_serves_from_its_own_files(tmp_path: Path) -> None:
    agent_dir = install_agent(tmp_path / "runtime", PYTHON)
    assert sorted(p.name for p in agent_dir.glob("*.py")) == sorted(AGENT_FILES)
    workdir = tmp_path / "work"
    workdir.mkdir()
    # As in a sandbox: the `corral` package cannot be imported, so the agent uses its copies.
    probe = subprocess.run([PYTHON, "-E", "-s", "-S", "-c", "import corral"], cwd=workdir)
    assert probe.returncode != 0
    process = await asyncio.create_subprocess_exec(
        *agent_command(str(agent_dir), PYTHON, str(workdir)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=workdir,
    )
    assert process.stdout is not None and process.stdin is not None
    guest = GuestConnection(process.stdout, process.stdin)
    await guest.start()
    try:
        assert (await guest.ping())["workdir"] == str(workdir)
        stdout, _, result = await (await guest.exec(["sh", "-c", "echo hi; exit 3"])).collect()
        assert (stdout, result.exit_code) == (b"hi\n", 3)
        await guest.write_file("a.txt", b"content")
        assert await guest.rename("a.txt", "b.txt") is not None
        assert await guest.read_bytes("b.txt") == b"content"
        assert [entry.name for entry in await guest.list_dir(".")] == ["b.txt"]
    finally:
        await guest.aclose()
        try:
            await asyncio.wait_for(process.wait(), 5)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

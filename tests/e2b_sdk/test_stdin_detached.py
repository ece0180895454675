"""The official SDK on input to a disconnected background command, and on an unknown
user (envd's 401)."""

from __future__ import annotations

import time

import pytest
from e2b import AuthenticationException, Sandbox


def _gone(sandbox: Sandbox, pid: int) -> bool:
    deadline = time.monotonic() + 30
    while pid in [p.pid for p in sandbox.commands.list()]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stdin_reaches_a_disconnected_background_command(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat > copy", background=True, stdin=True)
    handle.disconnect()
    sandbox.commands.send_stdin(handle.pid, "sent after disconnect\n")
    sandbox.commands.close_stdin(handle.pid)
    assert _gone(sandbox, handle.pid), "cat did not end at the end of its input"
    assert sandbox.files.read("copy") == "sent after disconnect\n"


def test_an_unknown_user_is_an_authentication_error(sandbox: Sandbox) -> None:
    with pytest.raises(AuthenticationException, match="its users are root"):
        sandbox.files.read("anything", user="ghost")
    with pytest.raises(AuthenticationException, match="its users are root"):
        sandbox.commands.run("true", user="ghost")

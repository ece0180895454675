"""The `base` template as E2B code meets it, through the official SDK (sync and async):
`user` in /home/user with umask 022, the tools E2B's tests use, `user="root"`, `sudo`
(E2B's own `sudo echo "$FOO"`), and a boot id of the sandbox's own that a pause keeps."""

from __future__ import annotations

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def test_base_runs_as_user_in_its_home_with_umask_022_and_the_tools(sandbox: Sandbox) -> None:
    who = sandbox.commands.run("whoami; pwd; echo $HOME; id -Gn; umask").stdout.split()
    assert who[:3] == ["user", "/home/user", "/home/user"] and "sudo" in who and "0022" in who
    modes = sandbox.commands.run("touch f && mkdir d && stat -c %a f d").stdout.split()
    assert modes == ["644", "755"]
    tools = sandbox.commands.run(
        "python3 -c 'print(6*7)' && git --version && curl --version >/dev/null "
        "&& tput -T xterm-256color cols && ps -o comm= -p $$ && command -v realpath ln kill"
    )
    assert tools.stdout.splitlines()[0] == "42" and tools.stdout.splitlines()[1].startswith("git ")
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"


def test_sudo_as_e2b_code_uses_it(sandbox: Sandbox) -> None:
    # E2B's test_env_vars: the shell expands $FOO, sudo echoes it.
    assert sandbox.commands.run('sudo echo "$FOO"', envs={"FOO": "bar"}).stdout == "bar\n"
    assert sandbox.commands.run("sudo whoami; sudo -u user whoami").stdout == "root\nuser\n"
    done = sandbox.commands.run("echo data | sudo tee /root/f >/dev/null && sudo cat /root/f")
    assert done.stdout == "data\n"
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("sudo sh -c 'echo no >&2; exit 3'")
    assert (failed.value.exit_code, failed.value.stderr) == (3, "no\n")
    with pytest.raises(CommandExitException) as refused:
        sandbox.commands.run("sudo -Z true")
    assert refused.value.exit_code == 1 and "not supported" in refused.value.stderr


def test_boot_id_is_the_sandboxs_own_and_a_pause_keeps_it(sandbox: Sandbox) -> None:
    first = sandbox.commands.run(f"cat {BOOT_ID}").stdout
    assert len(first.strip()) == 36
    other = Sandbox.create("base", timeout=60)
    try:
        assert other.commands.run(f"cat {BOOT_ID}").stdout != first
    finally:
        other.kill()
    sandbox.pause()
    resumed = Sandbox.connect(sandbox.sandbox_id)
    assert resumed.commands.run(f"cat {BOOT_ID}").stdout == first


async def test_async_sudo_root_and_home(async_sandbox: AsyncSandbox) -> None:
    done = await async_sandbox.commands.run('sudo echo "$FOO"', envs={"FOO": "bar"})
    assert done.stdout == "bar\n"
    assert (await async_sandbox.commands.run("whoami", user="root")).stdout == "root\n"
    assert (await async_sandbox.commands.run("pwd")).stdout == "/home/user\n"
    with pytest.raises(CommandExitException) as failed:
        await async_sandbox.commands.run("sudo false")
    assert failed.value.exit_code == 1

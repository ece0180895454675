"""sudo in the `base` template, through the guest agent (corral.guest.agent_sudo): it runs
the command as root with the caller's stdin, stdout, stderr, cwd and (sudo's) env, and
its exit code; it refuses callers outside the group `sudo` and options it lacks; and its
root is the sandbox's, never more (no mount, no new namespaces, no host, no other
sandbox). Real sandboxes of a real server (its base from the cached tar)."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import CommandError
from corral.guest import agent_source_dir
from tests.conftest import LiveServer, opts
from tests.kit import e2b_base
from tests.kit.polling import wait_until
from tests.test_guest import running_agent

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]


@pytest.fixture(scope="module")
def base_server(settings: Settings) -> Iterator[LiveServer]:
    with e2b_base.server_with_base(settings, "sudo-server-data") as server:
        yield server


@pytest.fixture
def sbx(base_server: LiveServer) -> Iterator[Sandbox]:
    with Sandbox.create("base", timeout=120, **opts(base_server)) as sandbox:
        yield sandbox


def bash(sbx: Sandbox, line: str, **options: object) -> tuple[int, str, str]:
    done = sbx.commands.run(["/bin/bash", "-l", "-c", line], **options)  # type: ignore[call-overload]
    return done.exit_code, done.stdout, done.stderr


def test_sudo_runs_as_root_with_the_callers_env_cwd_stdin_and_exit_code(sbx: Sandbox) -> None:
    # E2B's own test: the shell expands $FOO before sudo runs.
    assert bash(sbx, 'sudo echo "$FOO"', envs={"FOO": "bar"}) == (0, "bar\n", "")
    assert bash(sbx, "sudo id -un; sudo id -u")[1].split() == ["root", "0"]
    assert bash(sbx, "sudo sh -c 'exit 7'")[0] == 7
    assert bash(sbx, "cd /tmp && sudo pwd")[1] == "/tmp\n"
    done = sbx.commands.run(["sudo", "tee", "/root/note"], input="from stdin\n")
    assert (done.exit_code, done.stdout) == (0, "from stdin\n")
    assert bash(sbx, "sudo cat /root/note; cat /root/note 2>/dev/null || echo denied")[1] == (
        "from stdin\ndenied\n"
    )
    # sudo's env_reset: the caller's variables stay behind unless -E or NAME=value.
    env = "echo ${FOO:-unset} $HOME $USER $SUDO_USER $SUDO_UID"
    reset = bash(sbx, f"FOO=1 sudo sh -c '{env}'")[1].split()
    assert reset == ["unset", "/root", "root", "user", "1000"]
    assert bash(sbx, f"FOO=1 sudo -E sh -c '{env}'")[1].split()[0] == "1"
    assert bash(sbx, "sudo FOO=2 sh -c 'echo $FOO'")[1] == "2\n"
    assert bash(sbx, "sudo --preserve-env=FOO sh -c 'echo $FOO'", envs={"FOO": "3"})[1] == "3\n"
    # -u, -i (the target's login shell, in its home), -s, -n.
    assert bash(sbx, "sudo -u user id -un; sudo -n -u root true")[1] == "user\n"
    assert bash(sbx, "sudo -i pwd; sudo -i sh -c 'echo $0' ")[1].split()[0] == "/root"
    assert bash(sbx, "sudo -s id -u")[1] == "0\n"
    # -i and -s give the shell the command's words escaped, as sudo does.
    assert bash(sbx, """sudo -i echo 'a  b' "it's" '*'""")[1] == "a  b it's *\n"
    # Output order and stderr are the command's own.
    assert bash(sbx, "sudo sh -c 'echo out; echo err >&2'")[1:] == ("out\n", "err\n")
    # As root, sudo -u user drops to user; a file root makes is root's.
    assert bash(sbx, "sudo -u user id -u", user="root")[1] == "1000\n"
    assert bash(sbx, "sudo touch /made && stat -c %U /made")[1] == "root\n"


def test_sudo_refuses_what_it_does_not_know_and_who_may_not(sbx: Sandbox) -> None:
    code, _, err = bash(sbx, "sudo -X true")
    assert code == 1 and "option -X is not supported" in err
    code, _, err = bash(sbx, "sudo --chroot=/ true")
    assert code == 1 and "--chroot is not supported" in err
    code, _, err = bash(sbx, "sudo no-such-program")
    assert code == 1 and "no-such-program: command not found" in err
    code, _, err = bash(sbx, "sudo -u nobody-here true")
    assert code == 1 and "unknown user nobody-here" in err
    code, _, err = bash(sbx, "sudo")
    assert code == 1 and err.startswith("usage: sudo")
    # A user outside the group sudo is refused (as without a sudoers entry).
    code, _, err = bash(sbx, "sudo id -u", user="nobody")
    assert code == 1 and "nobody is not in the sudoers file" in err
    # Nor does a sudoer's own socket client help a non-member: the agent checks the peer.
    code, _, err = bash(sbx, "python3 -I /.corral/sudo.py true", user="nobody")
    assert code == 1 and "not in the sudoers file" in err


def test_the_command_ends_with_sudo_and_signals_reach_it(sbx: Sandbox) -> None:
    handle = sbx.commands.run(["/bin/bash", "-l", "-c", "sudo sleep 4242"], background=True)
    wait_until(lambda: "sleep 4242" in bash(sbx, "ps -eo args")[1], "sudo's sleep to start")
    handle.kill()
    wait_until(lambda: "sleep 4242" not in bash(sbx, "ps -eo args")[1], "the sleep to end")
    # A signal sudo gets goes on to its command (whose death by it is sudo's own).
    code, out, _ = bash(
        sbx,
        "sudo sh -c 'trap \"echo got TERM; exit 3\" TERM; echo ready; sleep 30 & wait' & "
        "until sudo pgrep -f 'echo got TERM' >/dev/null; do sleep 0.05; done; sleep 0.2; "
        "kill -TERM %1; wait %1",
    )
    assert (code, out) == (3, "ready\ngot TERM\n")


def test_sudo_root_is_the_sandboxs_root_and_no_more(
    sbx: Sandbox, base_server: LiveServer, settings: Settings
) -> None:
    root_caps = bash(sbx, "grep CapEff /proc/self/status", user="root")[1]
    assert bash(sbx, "sudo grep CapEff /proc/self/status")[1] == root_caps
    assert int(root_caps.split()[1], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
    for line in (
        "sudo mount -t tmpfs none /mnt",
        "sudo unshare --mount true",
        "sudo unshare --user true",
        "sudo nsenter --mount=/proc/1/ns/mnt true",
        "sudo touch /.corral/written",
        "sudo sh -c 'echo 1 > /proc/sys/kernel/random/boot_id'",
        "sudo mknod /tmp/disk b 8 0",
    ):
        code, _, err = bash(sbx, line)
        assert code != 0, (line, err)
    # The host's loopback is not the sandbox's.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code, _, _ = bash(sbx, f"sudo curl -s -m 3 http://127.0.0.1:{port}/")
        assert code != 0
    # What sudo's root writes belongs to the sandbox's own range of host ids, not root.
    marker = f"sudo-marker-{os.getpid()}-{time.monotonic_ns()}"
    assert bash(sbx, f"sudo touch /{marker}")[0] == 0
    found = list((settings.runtime_dir / "sandboxes").glob(f"*/disk/upper/{marker}"))
    assert len(found) == 1
    assert found[0].stat().st_uid >= settings.uid_base
    # Another sandbox's processes are out of sight.
    with Sandbox.create("base", timeout=120, **opts(base_server)) as other:
        other.commands.run("sleep 4343", background=True)
        assert "sleep 4343" not in bash(sbx, "sudo ps -eo args")[1]


async def test_an_agent_without_root_has_one_user_and_no_sudo(tmp_path: Path) -> None:
    # As a rootless server's sandboxes: the agent has one id, so there is no root to
    # become, and it does not listen for sudo (the client, here in the host's network
    # namespace, finds no socket).
    async with running_agent(tmp_path) as agent:
        me = str((await agent.guest.ping())["user"])
        with pytest.raises(CommandError, match=f"only '{me}' is available.*runs as root"):
            # (this agent's one user is the test's own, root itself when tests run as root)
            await agent.guest.exec(["true"], user="nobody" if me == "root" else "root")
        client = str(agent_source_dir() / "sudo.py")
        sudo = await agent.guest.exec([sys.executable, "-I", client, "id"])
        _, err, result = await sudo.collect()
        assert result.exit_code == 1
        assert b"one user only" in err and b"without sudo" in err

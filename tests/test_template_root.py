"""`root` and `user` inside sandboxes (root mode): each sandbox's uids 0-65535 are a range of
unprivileged host ids of its own, the template's layers idmapped with it. Its root
installs packages (dpkg, apt-get from a local file: repository) and owns what it writes;
it cannot touch the host, the kernel or another sandbox. Commands run as the template's
user unless they name another one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from corral.config import IDS_PER_SLOT, Settings
from corral.errors import InvalidRequest, PermissionDenied, UnknownUser
from corral.images import Layer, LayerStore, tree_digest
from corral.isolation import Engine, Sandbox
from corral.isolation.guest_view import ROOT_CAPS
from tests.conftest import LiveServer, host_processes_of_uid, require_backend, slot_ids
from tests.kit.debian import ARCHIVE, deb, needs_archive
from tests.kit.netdriver import Driver
from tests.test_network_rootless import create as rootless_create
from tests.test_network_rootless import delegated, home, rootless  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.sandbox, *needs_archive("python3", "busybox-static")]

# The capability numbers of ROOT_CAPS (linux/capability.h).
_CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10,
}  # fmt: skip


@pytest.fixture
def engine_debian(engine_debian: Engine) -> Engine:
    """The shared fixture's engine, for a root server only."""
    if os.geteuid() != 0:
        pytest.skip("root inside a sandbox needs Corral to run as root")
    return engine_debian


def first_id(box: Sandbox, settings: Settings) -> int:
    assert box.footprint.uid_slot is not None
    return slot_ids(settings, box.footprint.uid_slot)[0]


async def sh(box: Sandbox, script: str, user: str | None = None) -> str:
    ran = await box.run(["sh", "-c", script], user=user)
    assert ran.exit_code == 0, (script, ran.stdout, ran.stderr)
    return ran.stdout.decode()


async def test_root_installs_a_deb_with_dpkg_and_owns_what_it_writes(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    _, layer = debian_base
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        await box.write_file("/tmp/busybox.deb", deb("busybox-static").read_bytes())
        # `user` may not: dpkg needs root.
        ran = await box.run(["dpkg", "-i", "/tmp/busybox.deb"])
        assert ran.exit_code != 0
        await sh(box, "dpkg -i /tmp/busybox.deb", user="root")
        assert await sh(box, "busybox echo installed") == "installed\n"
        assert (await sh(box, "stat -c '%u %g %U' /usr/bin/busybox")).split() == ["0", "0", "root"]
        # Owners the image has keep their identity: groups shadow and mail.
        assert (await sh(box, "stat -c %U:%G /etc/shadow /var/mail")).split() == [
            "root:shadow",
            "root:mail",
        ]
        # Root's files on the sandbox's disk belong to the first id of its range; what
        # `user` writes, to first + 1000. Nothing is the host's root.
        await sh(box, "echo mine > /tmp/users-file")
        upper = box.footprint.path / "disk" / "upper"
        first = first_id(box, settings)
        assert (upper / "usr" / "bin" / "busybox").stat().st_uid == first
        assert (upper / "tmp" / "users-file").stat().st_uid == first + 1000
        for path in upper.rglob("*"):
            assert first <= path.lstat().st_uid < first + IDS_PER_SLOT, path
    finally:
        await box.destroy()
    assert tree_digest(layer.path) == layer.digest


def _packages_stanza(package: str) -> str:
    for stanza in (ARCHIVE / "Packages").read_text().split("\n\n"):
        if f"Package: {package}\n" in stanza + "\n":
            return stanza.strip() + "\n"
    raise AssertionError(f"{package} is not in {ARCHIVE}/Packages")


async def test_root_installs_with_apt_get_from_a_local_repository(
    engine_debian: Engine,
) -> None:
    """Network none: a `file:` source in the sandbox, copied in with the files API."""
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        stanza = _packages_stanza("busybox-static")
        filename = next(
            line.split(":", 1)[1].strip() for line in stanza.splitlines()
            if line.startswith("Filename:")
        )  # fmt: skip
        await box.write_file(f"/tmp/repo/{filename}", deb("busybox-static").read_bytes())
        await box.write_file("/tmp/repo/Packages", stanza.encode())
        source = "deb [trusted=yes] file:/tmp/repo ./\n"
        await sh(
            box,
            f"rm -f /etc/apt/sources.list.d/* && printf '{source}' > /etc/apt/sources.list && "
            "apt-get update -o Acquire::AllowInsecureRepositories=true 2>&1 && "
            "apt-get install -y --allow-unauthenticated busybox-static 2>&1",
            user="root",
        )
        assert await sh(box, "busybox echo from-apt") == "from-apt\n"
    finally:
        await box.destroy()


async def test_the_template_names_the_default_user_and_commands_another(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, layer = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        assert (await sh(box, "id -u; id -un; echo $HOME")).split() == ["0", "root", "/root"]
        assert (await sh(box, "id -u; id -un; echo $HOME", user="user")).split() == [
            "1000",
            "user",
            "/home/user",
        ]
        # A name or a uid of the template's own /etc/passwd, with its groups.
        assert (await sh(box, "id -u; id -Gn", user="_apt")).split() == ["42", "nogroup"]
        assert (await sh(box, "id -un", user="42")).split() == ["_apt"]
        with pytest.raises(UnknownUser, match="does not exist in this sandbox; its users are root"):
            await box.run(["true"], user="nobody-here")
    finally:
        await box.destroy()
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        assert (await sh(box, "id -u; id -un")).split() == ["1000", "user"]
    finally:
        await box.destroy()
    # A user the template's /etc/passwd lacks: refused when a sandbox starts, clearly.
    engine_debian.templates.add("debian-ghost", store, [layer.digest], user="ghost")
    with pytest.raises(InvalidRequest, match="'ghost', which its /etc/passwd does not have"):
        await engine_debian.create(template="debian-ghost", isolation="namespace")
    with pytest.raises(InvalidRequest, match="asks for user"):
        engine_debian.templates.add("bad", store, [layer.digest], user="Root;rm")


def _caps(status: str) -> int:
    return int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )


async def test_root_keeps_only_the_capabilities_packages_need_and_user_none(
    engine_debian: Engine,
) -> None:
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        expected = sum(1 << _CAP_NUMBERS[name] for name in ROOT_CAPS)
        assert _caps(await sh(box, "cat /proc/self/status", user="root")) == expected
        assert _caps(await sh(box, "cat /proc/self/status")) == 0
        assert "CapAmb:\t0000000000000000" in await sh(box, "cat /proc/self/status")
    finally:
        await box.destroy()


HOSTILE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def refused(name, call):
    try:
        result = call()
    except OSError as exc:
        print(name, "refused", errno.errorcode[exc.errno])
        return
    if isinstance(result, int) and result < 0:
        print(name, "refused", errno.errorcode[ctypes.get_errno()])
    else:
        print(name, "ALLOWED", result)
refused("write-ro-bind", lambda: open("/.corral/evil", "w"))
refused("mount", lambda: libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
refused("setns", lambda: libc.setns(os.open("/proc/self/ns/mnt", os.O_RDONLY), 0))
refused("unshare-user", lambda: libc.unshare(0x10000000))
refused("finit_module", lambda: libc.syscall(313, os.open("/etc/hostname", os.O_RDONLY), b"", 0))
refused("ptrace-agent", lambda: libc.ptrace(16, 1, None, None))
open("/tmp/f", "w").close()
refused("chown-outside", lambda: os.chown("/tmp/f", 70000, 70000))
for pid in sys.argv[1:]:
    refused("kill-other-sandbox", lambda: os.kill(int(pid), 9))
    refused("other-sandbox-root", lambda: os.listdir(f"/proc/{pid}/root"))
"""


async def test_root_inside_cannot_touch_the_host_the_kernel_or_another_sandbox(
    engine_debian: Engine, settings: Settings
) -> None:
    box = await engine_debian.create(template="debian", isolation="namespace")
    other = await engine_debian.create(template="debian", isolation="namespace")
    try:
        # Disjoint ranges.
        maps = [(await sh(b, "cat /proc/self/uid_map")).split() for b in (box, other)]
        assert [m[0] for m in maps] == ["0", "0"] and maps[0][2] == maps[1][2] == "65536"
        starts = sorted(int(m[1]) for m in maps)
        assert starts[0] + IDS_PER_SLOT <= starts[1]
        await sh(other, "echo secret > /tmp/secret", user="root")
        pids = [
            str(p)
            for p in host_processes_of_uid(*slot_ids(settings, other.footprint.uid_slot or 0))
        ]
        assert pids
        await box.write_file("/tmp/hostile.py", HOSTILE.encode())
        out = await sh(box, "python3 /tmp/hostile.py " + " ".join(pids), user="root")
        lines = out.splitlines()
        assert lines and all(" refused " in line for line in lines), out
        assert "chown-outside refused EINVAL" in lines
        # The other sandbox's files are on its own disk, untouched.
        assert await sh(other, "cat /tmp/secret") == "secret\n"
        assert "secret" not in await sh(box, "ls /tmp")
    finally:
        await box.destroy()
        await other.destroy()


async def test_host_template_root_sees_host_files_as_nobody_and_cannot_change_them(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "namespace")
    if os.geteuid() != 0:
        pytest.skip("root inside a sandbox needs Corral to run as root")
    box = await engine.create(template="host", isolation="namespace")
    try:
        assert (await sh(box, "id -un; stat -c %U /usr/bin/env", user="root")).split() == [
            "root",
            "nobody",
        ]
        ran = await box.run(
            ["sh", "-c", "touch /usr/bin/evil || chmod 777 /usr/bin/env"], user="root"
        )
        assert ran.exit_code != 0
        assert not Path("/usr/bin/evil").exists()
        # Root's own places: it may write /tmp and /workspace (the user's, by capability).
        await sh(box, "echo x > /workspace/by-root && chown user /workspace/by-root", user="root")
        assert await sh(box, "stat -c %U /workspace/by-root") == "user\n"
    finally:
        await box.destroy()


def test_the_api_and_cli_run_a_command_as_root_or_another_user(server: LiveServer) -> None:
    """ExecRequest.user through the real server: `corral sandbox exec --user`."""
    if os.geteuid() != 0:
        pytest.skip("root inside a sandbox needs Corral to run as root")
    created = server.corral("sandbox", "create", "--output", "json")
    assert created.returncode == 0, created.stderr
    sandbox_id = json.loads(created.stdout)["sandbox_id"]
    try:
        done = server.corral("sandbox", "exec", "--user", "root", sandbox_id, "--", "id", "-un")
        assert (done.returncode, done.stdout) == (0, "root\n"), done.stderr
        done = server.corral("sandbox", "exec", sandbox_id, "--", "id", "-un")
        assert (done.returncode, done.stdout) == (0, "user\n"), done.stderr
        done = server.corral("sandbox", "exec", "--user", "ghost", sandbox_id, "--", "true")
        assert done.returncode != 0 and "user 'ghost' does not exist" in done.stderr
    finally:
        server.corral("sandbox", "kill", sandbox_id)


async def test_user_comes_from_a_kept_layer_after_the_first_sandbox(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    """The first sandbox of a template adds `user` to its /etc/passwd and /etc/group
    (copied up to its disk); later ones find them in a small layer kept for the template,
    with the template's modes and owners, and copy nothing up until they write."""
    store, layer = debian_base
    engine_debian.templates.add("debian-accounts", store, [layer.digest])
    shutil.rmtree(settings.data_dir / "accounts", ignore_errors=True)  # earlier tests'
    seen = []
    for _ in range(2):
        box = await engine_debian.create(template="debian-accounts", isolation="namespace")
        try:
            upper = box.footprint.path / "disk" / "upper" / "etc"
            seen.append(sorted(p.name for p in upper.iterdir()) if upper.is_dir() else [])
            script = "id -un; stat -c '%a %U:%G' /etc /etc/passwd /etc/group; getent group user"
            out = (await sh(box, script)).split("\n")
            assert out[:4] == ["user", "755 root:root", "644 root:root", "644 root:root"]
            assert out[4].startswith("user:x:1000:")
            # Root still edits them (copied up from the layer).
            await sh(box, "echo extra:x:1001:1001::/:/bin/sh >> /etc/passwd", user="root")
            assert (await sh(box, "id -u extra")).strip() == "1001"
        finally:
            await box.destroy()
    assert "passwd" in seen[0] and "group" in seen[0]
    assert "passwd" not in seen[1] and "group" not in seen[1]


async def test_files_are_read_and_written_as_the_default_user(engine_debian: Engine) -> None:
    """The agent is root, but its file calls act as the template's user: the kernel checks
    that user's permissions and new files are its own."""
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        await box.write_file("/workspace/mine.txt", b"hi\n")
        assert (await sh(box, "stat -c %U:%G /workspace/mine.txt")).strip() == "user:user"
        with pytest.raises(PermissionDenied):
            await box.write_file("/etc/evil", b"x")
        with pytest.raises(PermissionDenied):
            await box.read_bytes("/etc/shadow")
    finally:
        await box.destroy()
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:  # a template whose user is root: its file calls are root's
        await box.write_file("/etc/by-root", b"x")
        assert (await sh(box, "stat -c %U /etc/by-root")).strip() == "root"
    finally:
        await box.destroy()


def test_rootless_has_one_user_and_refuses_root_saying_why(rootless: Driver) -> None:  # noqa: F811
    """Without root, Corral has one host id per sandbox: `user` only."""
    sandbox = rootless_create(rootless, "none")
    try:
        done = rootless.ok(op="run", id=sandbox, argv=["id", "-un"])
        assert done["stdout"] == "user\n"
        answer = rootless.call(op="run", id=sandbox, argv=["id", "-u"], user="root")
        assert answer.get("error") == "CommandError", answer  # FAILED_PRECONDITION
        assert "server runs as root" in answer["message"]
    finally:
        rootless.ok(op="destroy", id=sandbox)

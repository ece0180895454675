"""The guest agent in templates that have no Python, no shell or another libc.

Two images are built here from Debian packages of the local archive (no registry is
reachable from tests) and imported through the real path (skopeo archive -> `oci.pull`
-> `Engine.templates.add`):
- `musl`: Alpine-like, musl's loader and libc (Debian's `musl`) with busybox-static as
  its userland, a /bin/sh, no glibc and no Python;
- `distroless`: one static binary (busybox, without its applet links: no shell) and an
  /etc/passwd.
The agent runs in both with the host's interpreter bound under /.corral; every call the
host makes works, and the commands it starts see nothing of it (no LD_* variable, no
/.corral path in their environment) and run with the template's own libc.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.images import LayerStore, oci
from corral.isolation import Engine
from tests.conftest import require_backend
from tests.kit.debian import deb, needs_archive
from tests.kit.oci_images import skopeo_copy, tar_tree, write_layout

pytestmark = [
    pytest.mark.sandbox,
    *needs_archive("musl", "busybox-static"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is missing: make setup"),
]

PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)


def musl_rootfs(root: Path) -> Path:
    """Alpine's shape: /lib/ld-musl-x86_64.so.1, busybox and its applets, no glibc."""
    for package in ("musl", "busybox-static"):
        subprocess.run(["dpkg-deb", "-x", str(deb(package)), str(root)], check=True)
    for applet in ("sh", "cat", "echo", "env", "false", "ls", "pwd", "sleep", "id"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "srv").mkdir()  # the image's WorkingDir
    return root


def distroless_rootfs(root: Path, scratch: Path) -> Path:
    """One static binary and the account files: no shell, no libc, no Python."""
    subprocess.run(["dpkg-deb", "-x", str(deb("busybox-static")), str(scratch)], check=True)
    (root / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(scratch / "bin" / "busybox", root / "usr" / "bin" / "busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text("root:x:0:\nnonroot:x:65532:\n")
    (root / "srv").mkdir()  # the image's WorkingDir
    return root


@dataclasses.dataclass(frozen=True)
class Images:
    store: LayerStore
    pulled: dict[str, oci.Image]

    def add(self, engine: Engine, name: str) -> None:
        """Register the image `name` as a template, with its config's Env and WorkingDir."""
        config = self.pulled[name].config
        env = dict(entry.split("=", 1) for entry in config.env)
        workdir = config.working_dir or None
        engine.templates.add(name, self.store, self.pulled[name].layers, env=env, workdir=workdir)


@pytest.fixture(scope="module")
def images(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Both images pulled into one store: `musl` from an oci-archive, `distroless` from a
    docker-archive, each a one-layer image with its own Env and WorkingDir."""
    if os.geteuid() != 0:
        pytest.skip("layer templates need root")
    work = tmp_path_factory.mktemp("images")
    store = LayerStore(settings.data_dir / "templates")
    roots = {
        "musl": musl_rootfs(work / "musl"),
        "distroless": distroless_rootfs(work / "distroless", work / "busybox"),
    }
    pulled = {}
    for name, root in roots.items():
        config = {"Env": ["PATH=/usr/bin:/bin", f"IMAGE={name}"], "WorkingDir": "/srv"}
        layout = write_layout(work / f"{name}.layout", [tar_tree(root)], config)
        if name == "musl":
            archive = f"oci-archive:{work / 'musl.oci.tar'}"
        else:
            archive = f"docker-archive:{work / 'distroless.docker.tar'}"
        skopeo_copy(f"oci:{layout}:1", archive + ("" if name == "musl" else ":corral/d:1"))
        pulled[name] = oci.pull(archive, store)
    return Images(store, pulled)


@pytest.fixture
def engine_images(engine: Engine, settings: Settings, images: Images) -> Engine:
    require_backend(settings, "namespace")
    for name in images.pulled:
        images.add(engine, name)
    return engine


@pytest.mark.parametrize("name", ["musl", "distroless"])
async def test_the_agent_serves_every_call_in_a_template_without_python(
    engine_images: Engine, name: str
) -> None:
    bb = [] if name == "musl" else ["busybox"]  # distroless: no applet links
    box = await engine_images.create(template=name, isolation="namespace", env={"SPEC": "x"})
    try:
        # Nothing of Python or glibc in the template: the agent brought its own.
        for missing in ("/usr/bin/python3", "/lib/x86_64-linux-gnu", "/lib64"):
            ran = await box.run([*bb, "ls", missing])
            assert ran.exit_code == 1 and b"No such file" in ran.stderr, missing
        # stdout, exit codes, the image's workdir and environment, the sandbox's user.
        ran = await box.run([*bb, "echo", "hello", name])
        assert (ran.stdout, ran.exit_code) == (f"hello {name}\n".encode(), 0)
        assert (await box.run([*bb, "false"])).exit_code == 1
        ran = await box.run([*bb, "id", "-u"])
        assert ran.stdout == b"1000\n", ran.stderr
        lines = (await box.run([*bb, "env"])).stdout.decode().splitlines()
        env = dict(line.split("=", 1) for line in lines)
        assert (env["IMAGE"], env["SPEC"], env["PATH"]) == (name, "x", "/usr/bin:/bin")
        # The commands run with the template's own loader: nothing leaks from the agent's.
        assert not [key for key in env if key.startswith(("LD_", "PYTHON"))], env
        assert not [value for value in env.values() if ".corral" in value], env
        assert (await box.run([*bb, "pwd"])).stdout == b"/srv\n"
        # stdin in, stdout out.
        cat = await box.exec([*bb, "cat"], stdin=True)
        await cat.write_stdin(b"through stdin\n")
        await cat.close_stdin()
        done = await cat.collect()
        assert (done.stdout, done.exit_code) == (b"through stdin\n", 0)
        # A long-running process, listed, then killed.
        sleeper = await box.exec([*bb, "sleep", "600"], tag="long")
        assert [p.tag for p in await box.processes()] == ["long"]
        await sleeper.kill()
        ended = await sleeper.wait()
        assert (ended.reason, ended.signal) == ("killed", signal.SIGKILL)
        # Files: write, read, stat, list, mkdir, move, remove.
        await box.write_file("/workspace/in/data.bin", b"\x00bytes\xff")
        assert await box.read_bytes("/workspace/in/data.bin") == b"\x00bytes\xff"
        assert (await box.stat("/workspace/in/data.bin")).size == 7
        assert await box.make_dir("/workspace/out")
        await box.rename("/workspace/in/data.bin", "/workspace/out/moved.bin")
        assert [e.name for e in await box.list_dir("/workspace/out")] == ["moved.bin"]
        ran = await box.run([*bb, "cat", "/workspace/out/moved.bin"])  # written by the agent
        assert ran.stdout == b"\x00bytes\xff"
        await box.remove("/workspace/out", recursive=True)
        assert (await box.run([*bb, "ls", "/workspace/out"])).exit_code == 1
    finally:
        await box.destroy()


async def test_programs_of_a_musl_template_run_with_its_libc(engine_images: Engine) -> None:
    box = await engine_images.create(template="musl", isolation="namespace")
    try:
        # musl's dynamic loader is a musl program: it runs, and says what it is.
        ran = await box.run(["/lib/ld-musl-x86_64.so.1"])
        assert b"musl libc (x86_64)" in ran.stderr
        # Its shell runs shell commands, exit codes and stderr included.
        ran = await box.run("echo $((6 * 7)); echo oops >&2; exit 7")
        assert (ran.stdout, ran.stderr, ran.exit_code) == (b"42\n", b"oops\n", 7)
        # The agent and the host's interpreter under /.corral are read-only to its code.
        for target in ("/.corral/agent.py", "/.corral/usr/bin/evil"):
            ran = await box.run(f"echo x > {target}")
            assert ran.exit_code != 0 and b"Read-only file system" in ran.stderr, target
    finally:
        await box.destroy()


async def test_a_shell_command_in_a_template_without_a_shell_fails_clearly(
    engine_images: Engine,
) -> None:
    box = await engine_images.create(template="distroless", isolation="namespace")
    try:
        ran = await box.run("echo hi")
        assert ran.exit_code == 127
        assert "no /bin/sh to run a shell command; run the program as argv" in ran.stderr.decode()
        ran = await box.run(["sh", "-c", "echo hi"])
        assert (ran.exit_code, ran.stderr) == (127, b"corral: command not found: sh\n")
        # The sandbox still serves.
        assert (await box.run(["busybox", "echo", "ok"])).stdout == b"ok\n"
    finally:
        await box.destroy()


def _a_script(tmp: Path) -> str:
    script = tmp / "python3"
    script.write_text('#!/bin/sh\nexec /usr/bin/python3 "$@"\n')
    script.chmod(0o755)
    return str(script)


def _a_copy_outside_usr(tmp: Path) -> str:
    copy = tmp / "python3"
    shutil.copy2(os.path.realpath("/usr/bin/python3"), copy)
    return str(copy)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_a_script, "is not a 64-bit ELF executable (a script?)"),
        (_a_copy_outside_usr, "outside the host trees a sandbox may see"),
    ],
)
async def test_a_host_that_cannot_provide_the_agent_is_refused_clearly(
    settings: Settings,
    images: Images,
    tmp_path_factory: pytest.TempPathFactory,
    make: Callable[[Path], str],
    says: str,
) -> None:
    require_backend(settings, "namespace")
    tmp = tmp_path_factory.mktemp("python")
    tmp.chmod(0o755)
    python = make(tmp)
    engine = Engine(dataclasses.replace(settings, guest_python=python))
    try:
        images.add(engine, "musl")
        disks = set((settings.data_dir / "disks").glob("*.img"))
        with pytest.raises(IsolationUnavailable, match=r"CORRAL_GUEST_PYTHON") as refused:
            await engine.create(template="musl", isolation="namespace")
        assert says in str(refused.value)
        assert set((settings.data_dir / "disks").glob("*.img")) == disks  # nothing made
    finally:
        await engine.aclose()


def test_doctor_says_how_the_agent_is_provided() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "CORRAL_ALLOW_PROCESS_BACKEND": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loader = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    python = os.path.realpath("/usr/bin/python3")
    expected = (
        f"guest_agent=/usr/bin/python3 (layer templates: {python} through {loader}, "
        "host /usr read-only at /.corral/)"
    )
    assert expected in " ".join(done.stdout.split())

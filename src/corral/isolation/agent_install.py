"""Put the guest agent where every sandbox can read it, and say how a sandbox runs it.

The agent's files (`AGENT_FILES`) are copied once per process into ``<runtime_dir>/guest/<digest>``
(world-readable, so sandboxes running as unprivileged host uids can read it even when
Corral itself is installed under /root) and byte-compiled with the interpreter that will
run them, so the agent starts without compiling anything.

`host`-template sandboxes run it with the host's Python, which they see at its own path.
A layer template may have no Python, no shell and another libc (Alpine's musl, a
distroless image): its sandboxes run the agent with the HOST's interpreter instead
(`GuestRuntime`), bound read-only under ``/.corral/`` and started through the host's own
dynamic loader with an explicit library path and no loader cache, so nothing of the
template's libc is loaded into the agent. The loader's options are arguments, not
``LD_*`` variables: the commands the agent starts exec the template's programs with the
template's own loader and an environment that names nothing under ``/.corral``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import IsolationUnavailable
from corral.guest import AGENT_FILES, agent_source_dir

# Where a sandbox sees the agent's files; the host trees the runtime needs go under it.
GUEST_DIR = "/.corral"
# The host trees a `GuestRuntime` may bind (at /.corral/<name>): where an interpreter, its
# libraries and its standard library live. Never /etc, /home, /root, /var or /run.
RUNTIME_TREES = ("usr", "lib", "lib64", "opt")
# What the agent imports from the standard library beyond the built-in modules: each must
# load in the runtime, checked once on the host (a missing lib-dynload module or shared
# library fails here with its name, not in every sandbox).
_PROBE = (
    "import sys, os, ctypes, json, pwd, select, _socket, _signal, traceback; "
    "ctypes.CDLL(None).getpid(); "
    "print(sys.version_info >= (3, 9)); print(os.path.dirname(os.__file__))"
)


def agent_command(agent_dir: str, python: str | Sequence[str], workdir: str) -> list[str]:
    """The argv that starts the agent from `agent_dir` (a path as the sandbox sees it)
    with `python` (a path, or a `GuestRuntime.argv`)."""
    interpreter = [python] if isinstance(python, str) else list(python)
    return [*interpreter, *python_options(agent_dir, "agent"), "--workdir", workdir]


def python_options(agent_dir: str, module: str) -> list[str]:
    """The interpreter's options that run `main()` of `module`, one of the agent's files
    in `agent_dir` (the agent, or a microVM's boot: `corral.guest.vm_boot`)."""
    # -I -S: isolated (no environment, no user site-packages, and no working directory
    # on the module path: the sandbox's user writes the agent's, and a module planted
    # there must never be what the agent imports later, e.g. `termios` at its first
    # terminal), no site module — fast and hermetic.
    # Importing (rather than running the file) uses the precompiled bytecode. `corral` is
    # marked missing: each agent module tries `corral.guest.<name>` first (as the host
    # imports it), which then fails at once instead of searching every path (~100
    # syscalls, each a trap into gVisor's kernel).
    bootstrap = (
        f"import sys; sys.modules['corral'] = None; sys.path.insert(0, {agent_dir!r}); "
        f"import {module}; {module}.main()"
    )
    return ["-I", "-S", "-c", bootstrap]


@functools.cache
def install_agent(runtime_dir: Path, python: str) -> Path:
    source = agent_source_dir()
    # The mount points of `GuestRuntime.trees` are part of what is installed.
    digest = hashlib.sha256(f"{python}\0{RUNTIME_TREES}".encode())
    for name in AGENT_FILES:
        digest.update((source / name).read_bytes())
    target = runtime_dir / "guest" / digest.hexdigest()[:16]
    if (target / "ready").exists():
        return target
    if not os.access(python, os.X_OK):
        raise IsolationUnavailable(
            f"the guest agent needs {python} on the host; install python3 "
            "(apt-get install python3) or set CORRAL_GUEST_PYTHON"
        )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    for name in AGENT_FILES:
        shutil.copyfile(source / name, staging / name)
    compiled = subprocess.run(
        [python, "-m", "compileall", "-q", str(staging)], capture_output=True, text=True
    )
    if compiled.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise IsolationUnavailable(
            f"{python} could not compile the guest agent ({compiled.stderr.strip()[-200:]}); "
            "point CORRAL_GUEST_PYTHON at a Python 3.9+ interpreter"
        )
    for tree in RUNTIME_TREES:  # empty: where a layer template's sandbox binds a host tree
        (staging / tree).mkdir()
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (staging / "ready").touch(mode=0o644)
    try:
        staging.rename(target)
    except OSError:  # another process installed the same digest first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class GuestRuntime:
    """The host's interpreter as a layer template's sandbox runs it: the host trees to
    bind read-only at ``/.corral/<name>`` (`trees`) and the argv that starts it there."""

    python: str  # the interpreter binary on the host (CORRAL_GUEST_PYTHON, resolved)
    loader: str | None  # its dynamic loader on the host; None: a static binary
    trees: tuple[str, ...]  # names in RUNTIME_TREES, e.g. ("usr",)
    argv: tuple[str, ...]  # as the sandbox sees it, before the interpreter's options

    def describe(self) -> str:
        how = f" through {self.loader}" if self.loader else " (static)"
        trees = ", ".join(f"/{tree}" for tree in self.trees)
        return f"{self.python}{how}, host {trees} read-only at {GUEST_DIR}/"


@functools.cache
def guest_runtime(python: str) -> GuestRuntime:
    """How a layer template's sandbox runs the agent with the host's `python`, checked
    on the host once per process; IsolationUnavailable says what to install or set."""
    fix = "install python3 (apt-get install python3) or point CORRAL_GUEST_PYTHON at one"
    if not os.access(python, os.X_OK):
        raise IsolationUnavailable(f"the guest agent needs {python} on the host: {fix}")
    binary = os.path.realpath(python)
    loader = _elf_interpreter(binary)
    paths = [binary]
    host_argv = [binary]
    library_path: list[str] = []
    if loader is not None:
        loader = os.path.realpath(loader)
        listed = subprocess.run(
            [loader, "--inhibit-cache", "--list", binary], capture_output=True, text=True
        )
        libraries = [
            line.split("=>", 1)[1].split("(")[0].strip()
            for line in listed.stdout.splitlines()
            if "=>" in line
        ]
        if listed.returncode != 0 or "not found" in libraries:
            raise IsolationUnavailable(
                f"the host's loader {loader} cannot resolve the libraries of {binary} "
                f"({(listed.stderr or listed.stdout).strip()[-200:]}): {fix}"
            )
        # Without its cache the loader searches this path first, then its built-in
        # directories (of the sandbox's root): the path names every directory it needs.
        for library in libraries:
            directory = os.path.dirname(os.path.realpath(library))
            if directory not in library_path:
                library_path.append(directory)
        paths += [loader, *library_path]
        host_argv = [
            loader,
            "--inhibit-cache",
            "--library-path",
            ":".join(library_path),
            "--argv0",
            binary,
            binary,
        ]
    probe = subprocess.run(
        [*host_argv, "-E", "-s", "-S", "-c", _PROBE], capture_output=True, text=True
    )
    lines = probe.stdout.split()
    if probe.returncode != 0 or lines[:1] != ["True"]:
        raise IsolationUnavailable(
            f"{python} cannot run the guest agent on its own "
            f"({(probe.stderr.strip() or 'Python older than 3.9')[-200:]}): {fix}"
        )
    paths.append(os.path.realpath(lines[1]))  # its standard library
    trees: list[str] = []
    for path in paths:
        tree = path.split("/")[1]
        if tree not in RUNTIME_TREES:
            raise IsolationUnavailable(
                f"the guest agent's interpreter needs {path}, outside the host trees a "
                f"sandbox may see ({', '.join('/' + t for t in RUNTIME_TREES)}): point "
                "CORRAL_GUEST_PYTHON at a Python installed under /usr or /opt"
            )
        if tree not in trees:
            trees.append(tree)
    argv = [GUEST_DIR + arg if arg.startswith("/") else arg for arg in host_argv]
    if library_path:
        argv[host_argv.index("--library-path") + 1] = ":".join(
            GUEST_DIR + directory for directory in library_path
        )
    return GuestRuntime(binary, loader, tuple(trees), tuple(argv))


def _elf_interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP) of the 64-bit little-endian ELF file `path`;
    None for a static binary."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            raise IsolationUnavailable(
                f"{path} is not a 64-bit ELF executable (a script?): point "
                "CORRAL_GUEST_PYTHON at the Python interpreter binary"
            )
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            kind, _flags, offset, _vaddr, _paddr, size = struct.unpack("<IIQQQQ", f.read(40))
            if kind == 3:  # PT_INTERP: a NUL-terminated path
                f.seek(offset)
                return f.read(size).split(b"\0", 1)[0].decode()
    return None

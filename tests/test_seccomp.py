"""The namespace sandbox's seccomp filter: the assembled program, then the real kernel.

The unit tests read the program with a small classic-BPF interpreter (the subset the
assembler emits), which is how the aarch64 program is checked on an x86_64 host. The
sandbox tests run probes under real bubblewrap with the filter loaded, and run the same
probes without it, to show the refusals come from the filter and not from the missing
capabilities the sandbox has anyway.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from corral.errors import IsolationUnavailable
from corral.isolation.seccomp import (
    _AARCH64_SYSCALLS,
    _X86_64_SYSCALLS,
    DENIED_SYSCALLS,
    build_filter,
    filter_fd,
)

# --- Reading the program -------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
AUDIT_ARCH_I386 = 0x40000003
TABLES: Mapping[str, Mapping[str, int]] = {"x86_64": _X86_64_SYSCALLS, "aarch64": _AARCH64_SYSCALLS}

RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
RET_EPERM = 0x00050000 | errno.EPERM
RET_ENOSYS = 0x00050000 | errno.ENOSYS

LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
JUMPS = {JEQ_K, JGE_K, JSET_K}

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17
THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes to clone
TIOCSTI, TIOCLINUX, TCGETS = 0x5412, 0x541C, 0x5401

Insn = tuple[int, int, int, int]


def decode(program: bytes) -> list[Insn]:
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def run_filter(program: bytes, nr: int, arch: int, args: Sequence[int] = ()) -> int:
    """What the kernel would return for this seccomp_data, by interpreting the program."""
    padded = [*args, *[0] * (6 - len(args))]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & 0xFFFFFFFFFFFFFFFF for a in padded])
    insns = decode(program)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == LD_W_ABS:
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == RET_K:
            return k
        elif code in JUMPS:
            hit = {JEQ_K: acc == k, JGE_K: acc >= k, JSET_K: bool(acc & k)}[code]
            pc += 1 + (jt if hit else jf)
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def verdict(arch: str, syscall: str, *args: int) -> int:
    return run_filter(build_filter(arch), TABLES[arch][syscall], AUDIT_ARCH[arch], args)


# --- The assembled program -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_program_is_well_formed(arch: str) -> None:
    program = build_filter(arch)
    assert len(program) % 8 == 0
    insns = decode(program)
    assert 0 < len(insns) < 4096
    for index, (code, jt, jf, _) in enumerate(insns):
        assert code in {LD_W_ABS, RET_K, *JUMPS}
        if code in JUMPS:
            # Offsets are u8 by construction; they must also land inside the program.
            assert index + 1 + max(jt, jf) < len(insns)
    assert insns[-1][0] == RET_K


def test_program_bytes_are_deterministic() -> None:
    script = "import corral.isolation.seccomp as s; print(s.build_filter('x86_64').hex())"
    other = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    assert bytes.fromhex(other.stdout.strip()) == build_filter("x86_64")
    assert build_filter("amd64") == build_filter("x86_64")


def test_unsupported_architecture_is_refused() -> None:
    with pytest.raises(IsolationUnavailable, match="riscv64"):
        build_filter("riscv64")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_denied_syscalls_are_refused(arch: str) -> None:
    present = sorted(DENIED_SYSCALLS & set(TABLES[arch]))
    assert present
    for name in present:
        expected = RET_ENOSYS if name == "clone3" else RET_EPERM
        assert verdict(arch, name) == expected, name


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_argument_rules(arch: str) -> None:
    assert verdict(arch, "clone", SIGCHLD) == RET_ALLOW
    assert verdict(arch, "clone", THREAD_FLAGS) == RET_ALLOW
    assert verdict(arch, "clone", CLONE_NEWUSER | SIGCHLD) == RET_EPERM
    assert verdict(arch, "clone", CLONE_NEWNS) == RET_EPERM
    assert verdict(arch, "clone", CLONE_NEWNET | SIGCHLD) == RET_EPERM
    assert verdict(arch, "ioctl", 0, TCGETS) == RET_ALLOW
    assert verdict(arch, "ioctl", 0, TIOCSTI) == RET_EPERM
    assert verdict(arch, "ioctl", 0, TIOCLINUX) == RET_EPERM
    # The kernel reads the request as unsigned int, so junk in the high word is ignored.
    assert verdict(arch, "ioctl", 0, (1 << 32) | TIOCSTI) == RET_EPERM
    assert verdict(arch, "personality", 0) == RET_ALLOW
    assert verdict(arch, "personality", 0xFFFFFFFF) == RET_ALLOW
    assert verdict(arch, "personality", 0x0040000) == RET_EPERM  # ADDR_NO_RANDOMIZE


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_foreign_architecture_is_killed(arch: str) -> None:
    program = build_filter(arch)
    assert run_filter(program, 20, AUDIT_ARCH_I386) == RET_KILL_PROCESS
    other = next(a for a in AUDIT_ARCH if a != arch)
    assert run_filter(program, 0, AUDIT_ARCH[other]) == RET_KILL_PROCESS


def test_x32_abi_is_refused_on_x86_64() -> None:
    program = build_filter("x86_64")
    getpid = 39
    assert run_filter(program, getpid, AUDIT_ARCH["x86_64"]) == RET_ALLOW
    assert run_filter(program, getpid | 0x40000000, AUDIT_ARCH["x86_64"]) == RET_ENOSYS


def test_everything_else_is_allowed() -> None:
    numbers = set(_X86_64_SYSCALLS.values())
    program = build_filter("x86_64")
    for nr in range(460):
        if nr not in numbers:
            assert run_filter(program, nr, AUDIT_ARCH["x86_64"]) == RET_ALLOW, nr


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),  # aarch64 uses the generic table
}


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_syscall_numbers_match_kernel_headers(arch: str) -> None:
    header = HEADERS[arch]
    if not header.exists():
        pytest.skip(f"{header} is missing (install linux-libc-dev to check the table)")
    defined = {
        m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", header.read_text())
    }
    assert {name: defined.get(name) for name in TABLES[arch]} == dict(TABLES[arch])


def test_filter_fd_holds_the_program_sealed() -> None:
    fd = filter_fd()
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            assert f.read() == build_filter()
        assert not os.get_inheritable(fd)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\0" * 8, 0)
    finally:
        os.close(fd)


# --- Under bubblewrap ----------------------------------------------------------------

BWRAP = shutil.which("bwrap")
SANDBOX = (
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
    "--proc", "/proc",
    "--dev", "/dev",
)  # fmt: skip


@pytest.fixture(scope="module")
def bwrap() -> str:
    if BWRAP is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the probes run /usr/bin/python3 inside the sandbox; it is missing")
    trial = subprocess.run(
        [BWRAP, *SANDBOX, "--", "/usr/bin/true"], capture_output=True, text=True, timeout=30
    )
    if trial.returncode != 0:
        pytest.skip(f"bubblewrap cannot create namespaces here: {trial.stderr.strip()}")
    return BWRAP


def sandboxed(
    bwrap: str,
    argv: Sequence[str],
    *,
    seccomp: bool = True,
    binds: Sequence[tuple[Path, str]] = (),
) -> subprocess.CompletedProcess[str]:
    fd = filter_fd() if seccomp else -1
    extra = ["--seccomp", str(fd)] if seccomp else []
    for source, target in binds:
        extra += ["--ro-bind", str(source), target]
    try:
        return subprocess.run(
            [bwrap, *SANDBOX, *extra, "--", *argv],
            pass_fds=(fd,) if seccomp else (),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if seccomp:
            os.close(fd)


def python_in_sandbox(
    bwrap: str,
    code: str,
    *,
    seccomp: bool = True,
    binds: Sequence[tuple[Path, str]] = (),
) -> object:
    """Run ``code`` with the sandbox's /usr/bin/python3; return the JSON it prints last."""
    argv = ["/usr/bin/python3", "-E", "-s", "-S", "-c", textwrap.dedent(code)]
    result = sandboxed(bwrap, argv, seccomp=seccomp, binds=binds)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# Each probe runs in a forked child (so unshare, ptrace and stray clones leave the
# prober alone) and reports "ok" or the errno name.
PROBE_PRELUDE = """
import ctypes, errno, fcntl, json, os, termios
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long

def sc(nr, *args):
    if libc.syscall(L(nr), *[L(a) for a in args]) < 0:
        raise OSError(ctypes.get_errno(), "")

def clone(flags):
    pid = libc.syscall(L(56), L(flags), L(0), L(0), L(0), L(0))
    if pid == 0:
        os._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "")
    os.waitpid(pid, 0)

def controlling_pty():
    os.setsid()
    _, tty = os.openpty()
    fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
    return tty

def probe(action):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            action()
            outcome = "ok"
        except OSError as e:
            outcome = errno.errorcode.get(e.errno, str(e.errno))
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    return os.read(read, 100).decode() or "died"
"""

# x86_64 numbers; arguments are chosen so that, without the filter, the kernel
# answers something other than EPERM wherever it can (see the control test).
PROBES = {
    "mount": "sc(165, 0, 0, 0, 0, 0)",
    "umount2": "sc(166, 0, 0)",
    "unshare(CLONE_NEWUSER)": f"sc(272, {CLONE_NEWUSER})",
    "clone(CLONE_NEWUSER)": f"clone({CLONE_NEWUSER | SIGCHLD})",
    "clone(CLONE_NEWNS)": f"clone({CLONE_NEWNS | SIGCHLD})",
    "clone(CLONE_NEWUSER|CLONE_NEWNS)": f"clone({CLONE_NEWUSER | CLONE_NEWNS | SIGCHLD})",
    "ptrace(PTRACE_TRACEME)": "sc(101, 0, 0, 0, 0)",
    "bpf": "sc(321, 0, 0, 0)",
    "keyctl(KEYCTL_GET_KEYRING_ID)": "sc(250, 0, -3, 0)",
    "kexec_load": "sc(246, 0, 0, 0, 0)",
    "init_module": "sc(175, 0, 0, 0)",
    "reboot": "sc(169, 0, 0, 0, 0)",
    "setns": "sc(308, -1, 0)",
    "io_uring_setup": "sc(425, 1, 0)",
    "perf_event_open": "sc(298, 0, 0, -1, -1, 0)",
    "userfaultfd(UFFD_USER_MODE_ONLY)": "sc(323, 1)",
    "process_vm_readv(self)": "sc(310, os.getpid(), 0, 0, 0, 0, 0)",
    "pidfd_getfd": "sc(438, -1, 0, 0)",
    "personality(ADDR_NO_RANDOMIZE)": "sc(135, 0x0040000)",
    "ioctl(TIOCSTI)": f"fcntl.ioctl(controlling_pty(), {TIOCSTI}, b'x')",
    "ioctl(TIOCLINUX)": f"fcntl.ioctl(controlling_pty(), {TIOCLINUX}, b'\\0')",
    "clone3": "sc(435, 0, 0)",
    "x32 getpid": f"sc({39 | 0x40000000})",
}
REFUSED_WITH = {name: "EPERM" for name in PROBES} | {"clone3": "ENOSYS", "x32 getpid": "ENOSYS"}

# Without the filter these fail differently, or succeed, whatever the host's sysctls:
# their EPERM under the filter can only come from the filter.
FILTER_ONLY_REFUSALS = [
    "mount",
    "umount2",
    "setns",
    "pidfd_getfd",
    "perf_event_open",
    "process_vm_readv(self)",
    "ioctl(TIOCLINUX)",
    "clone3",
]


def run_probes(bwrap: str, *, seccomp: bool) -> dict[str, str]:
    lines = [PROBE_PRELUDE, "results = {}"]
    lines += [f"results[{name!r}] = probe(lambda: {call})" for name, call in PROBES.items()]
    lines.append("print(json.dumps(results))")
    results = python_in_sandbox(bwrap, "\n".join(lines), seccomp=seccomp)
    assert isinstance(results, dict)
    return results


@pytest.fixture(scope="module")
def filtered(bwrap: str) -> dict[str, str]:
    return run_probes(bwrap, seccomp=True)


@pytest.fixture(scope="module")
def unfiltered(bwrap: str) -> dict[str, str]:
    return run_probes(bwrap, seccomp=False)


@pytest.mark.sandbox
@pytest.mark.hostile
@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_is_refused(filtered: dict[str, str], probe: str) -> None:
    assert filtered[probe] == REFUSED_WITH[probe]


@pytest.mark.sandbox
@pytest.mark.parametrize("probe", FILTER_ONLY_REFUSALS)
def test_refusal_comes_from_the_filter(unfiltered: dict[str, str], probe: str) -> None:
    assert unfiltered[probe] not in {"EPERM", "died"}


@pytest.mark.sandbox
def test_ordinary_programs_still_work(bwrap: str) -> None:
    results = python_in_sandbox(
        bwrap,
        """
        import json, os, socket, subprocess, threading, ctypes, termios

        out = {}
        out["subprocess"] = subprocess.run(["/bin/true"]).returncode
        # glibc's posix_spawn and pthread_create try clone3 first, then fall back to clone.
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], {})
        out["posix_spawn"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        seen = []
        threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["threads"] = sorted(seen)

        with open("/usr/lib/os-release") as f:
            out["read"] = "NAME=" in f.read()

        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        client.sendall(b"ping")
        out["loopback"] = conn.recv(4).decode()
        netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        out["netlink"] = netlink.fileno() >= 0

        out["imports"] = subprocess.run(
            ["/usr/bin/python3", "-E", "-s", "-S", "-c", "import ssl, json, asyncio"],
        ).returncode

        _, tty = os.openpty()
        out["tcgetattr"] = len(termios.tcgetattr(tty))
        libc = ctypes.CDLL(None, use_errno=True)
        out["personality_query"] = libc.syscall(ctypes.c_long(135), ctypes.c_long(0xFFFFFFFF))
        out["personality_linux"] = libc.syscall(ctypes.c_long(135), ctypes.c_long(0))
        print(json.dumps(out))
        """,
    )
    assert results == {
        "subprocess": 0,
        "posix_spawn": 3,
        "fork": 7,
        "threads": [0, 1, 2, 3],
        "read": True,
        "loopback": "ping",
        "netlink": True,
        "imports": 0,
        "tcgetattr": 7,
        "personality_query": 0,
        "personality_linux": 0,
    }


I386_GETPID = r"""
#include <stdio.h>
int main(void) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory"); /* i386 getpid */
    printf("%ld\n", ret);
    return 0;
}
"""


@pytest.fixture
def i386_binary(tmp_path: Path) -> Iterator[Path]:
    if os.uname().machine != "x86_64":
        pytest.skip("the i386 ABI probe needs an x86_64 host")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; it builds the int $0x80 probe")
    (tmp_path / "probe.c").write_text(I386_GETPID)
    subprocess.run(
        [gcc, "-O0", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True
    )
    yield tmp_path / "probe"


@pytest.mark.sandbox
@pytest.mark.hostile
def test_i386_abi_is_killed(bwrap: str, i386_binary: Path) -> None:
    binds = [(i386_binary, "/probe")]
    control = sandboxed(bwrap, ["/probe"], seccomp=False, binds=binds)
    if control.returncode != 0:
        pytest.skip(f"the kernel has no IA32 emulation (int $0x80 gave {control.returncode})")
    assert int(control.stdout) > 0  # a real i386 getpid went through
    code = """
        import json, subprocess
        print(json.dumps(subprocess.run(["/probe"], capture_output=True).returncode))
    """
    assert python_in_sandbox(bwrap, code, binds=binds) == -signal.SIGSYS


@pytest.mark.sandbox
def test_aarch64_program_passes_the_kernel_verifier(bwrap: str) -> None:
    # The kernel checks a classic-BPF program the same way on every architecture. On an
    # x86_64 host the aarch64 program then kills the sandbox at its first syscall (the
    # execve) for the wrong audit arch; a rejected program would make bwrap exit 1.
    if os.uname().machine != "x86_64":
        pytest.skip("checks the foreign program from an x86_64 host")
    fd = filter_fd("aarch64")
    try:
        result = subprocess.run(
            [bwrap, *SANDBOX, "--seccomp", str(fd), "--", "/usr/bin/true"],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(fd)
    assert result.returncode == 128 + signal.SIGSYS, result.stderr

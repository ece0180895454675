"""The seccomp filter that namespace sandboxes run under.

bubblewrap installs a classic-BPF program given to it as ``bwrap --seccomp FD``. No
seccomp library is available to Corral, so this module holds the policy as data — a
table of syscall numbers per architecture and a list of rules — and assembles the
program with a few small helpers. The policy is a deny-list: anything not named here
is allowed, and the namespaces, the missing capabilities and the resource limits
around the sandbox bound what those allowed calls can reach.

Refused calls fail with ``EPERM`` ("Operation not permitted"), so a program sees a
permission error instead of dying. The exception is a syscall made through a foreign
ABI (i386 ``int $0x80`` on an x86_64 host): the number means a different call there,
so the filter cannot judge it and the whole process is killed with ``SIGSYS``.

Only the arguments the kernel itself reads as 32-bit ``unsigned int`` are inspected
(clone's flags, ioctl's request, personality's persona), so comparing their low word
is exact. Calls whose decision depends on no argument let the kernel's seccomp action
cache (Linux 5.11+) skip the filter entirely for the allowed ones.

x86_64 is tested against the running kernel. The aarch64 table is checked against
the kernel's generic syscall header and the program is accepted by the kernel's BPF
verifier, but it has never run on an aarch64 host.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from corral.errors import IsolationUnavailable
from corral.isolation.launcher import data_fd

__all__ = ["DENIED_SYSCALLS", "build_filter", "filter_fd"]


# --- Architectures ------------------------------------------------------------------

# Numbers from the kernel's uapi headers: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h (which aarch64 uses). Only the calls the policy
# names are listed; a name missing from an architecture's table (iopl on aarch64)
# simply does not exist there, so its rule is dropped for that architecture.
_X86_64_SYSCALLS: Mapping[str, int] = {
    "ioctl": 16,
    "clone": 56,
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "personality": 135,
    "vhangup": 153,
    "pivot_root": 155,
    "_sysctl": 156,
    "adjtimex": 159,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}

_AARCH64_SYSCALLS: Mapping[str, int] = {
    "lookup_dcookie": 18,
    "ioctl": 29,
    "umount2": 39,
    "mount": 40,
    "pivot_root": 41,
    "nfsservctl": 42,
    "vhangup": 58,
    "quotactl": 60,
    "acct": 89,
    "personality": 92,
    "unshare": 97,
    "kexec_load": 104,
    "init_module": 105,
    "delete_module": 106,
    "clock_settime": 112,
    "syslog": 116,
    "ptrace": 117,
    "reboot": 142,
    "settimeofday": 170,
    "adjtimex": 171,
    "add_key": 217,
    "request_key": 218,
    "keyctl": 219,
    "clone": 220,
    "swapon": 224,
    "swapoff": 225,
    "perf_event_open": 241,
    "fanotify_init": 262,
    "name_to_handle_at": 264,
    "open_by_handle_at": 265,
    "clock_adjtime": 266,
    "setns": 268,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "kcmp": 272,
    "finit_module": 273,
    "bpf": 280,
    "userfaultfd": 282,
    "kexec_file_load": 294,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}


@dataclass(frozen=True)
class _Arch:
    name: str
    audit_arch: int  # AUDIT_ARCH_* from include/uapi/linux/audit.h
    syscalls: Mapping[str, int]
    byteorder: str  # "little" or "big": where the low word of a 64-bit argument sits
    # Which argument of clone() holds the flags. It is 0 on x86_64 and on aarch64
    # (CONFIG_CLONE_BACKWARDS only swaps tls and child_tid); s390 passes the stack
    # first (CONFIG_CLONE_BACKWARDS2), so a port there must set this to 1.
    clone_flags_arg: int
    # Syscall numbers at or above this belong to another ABI on the same audit arch
    # (x86_64's x32 ABI shares AUDIT_ARCH_X86_64 and sets bit 30); None if none.
    foreign_abi_floor: int | None


_ARCHES: Mapping[str, _Arch] = {
    "x86_64": _Arch(
        name="x86_64",
        audit_arch=0xC000003E,  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
        syscalls=_X86_64_SYSCALLS,
        byteorder="little",
        clone_flags_arg=0,
        foreign_abi_floor=0x40000000,  # __X32_SYSCALL_BIT
    ),
    "aarch64": _Arch(
        name="aarch64",
        audit_arch=0xC00000B7,  # EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
        syscalls=_AARCH64_SYSCALLS,
        byteorder="little",
        clone_flags_arg=0,
        foreign_abi_floor=None,  # arm32 compat calls carry AUDIT_ARCH_ARM, caught first
    ),
}
_ARCH_ALIASES: Mapping[str, str] = {"amd64": "x86_64", "arm64": "aarch64"}


# --- Policy -------------------------------------------------------------------------

# Namespace flags: a new namespace is a fresh kernel attack surface the sandbox must
# not build for itself (user namespaces above all: they hand out capabilities).
# CLONE_NEWTIME (0x80) lies inside clone()'s exit-signal byte, where no valid signal
# sets it, so including it refuses nothing that would otherwise work.
_CLONE_NEWTIME = 0x00000080
_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_NAMESPACE_FLAGS = (
    _CLONE_NEWTIME
    | _CLONE_NEWNS
    | _CLONE_NEWCGROUP
    | _CLONE_NEWUTS
    | _CLONE_NEWIPC
    | _CLONE_NEWUSER
    | _CLONE_NEWPID
    | _CLONE_NEWNET
)

_TIOCSTI = 0x5412  # push bytes into a terminal's input queue
_TIOCLINUX = 0x541C  # virtual-console tricks, including selection paste into input

_PER_LINUX = 0x0000
_PERSONALITY_QUERY = 0xFFFFFFFF

_REFUSED_OUTRIGHT: Sequence[tuple[str, Sequence[str]]] = (
    # The filesystem view is fixed by bubblewrap before the sandbox starts.
    (
        "mounts",
        (
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        ),
    ),
    # Leaving or creating namespaces (clone is checked by its flags below).
    ("namespaces", ("unshare", "setns")),
    # Whole-machine state: kernel code, swap, power, accounting, quotas.
    (
        "host administration",
        (
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "vhangup",
        ),
    ),
    # The clock is shared with the host; time namespaces are refused above.
    ("clocks", ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex")),
    # Large in-kernel interpreters and interfaces with a long history of escapes.
    (
        "kernel attack surface",
        (
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "fanotify_init",
        ),
    ),
    # The kernel keyring is not namespaced: keys would be shared with the host.
    ("keyrings", ("keyctl", "add_key", "request_key")),
    # Reaching into another process's memory, file descriptors or kernel objects.
    (
        "process inspection",
        ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"),
    ),
    # Host information and file handles that bypass the sandbox's mount view.
    ("host information", ("syslog", "lookup_dcookie", "open_by_handle_at", "name_to_handle_at")),
    # Raw port I/O and obsolete interfaces nothing legitimate needs.
    ("legacy", ("iopl", "ioperm", "nfsservctl", "uselib", "_sysctl")),
)


@dataclass(frozen=True)
class _Refuse:
    """Refuse the call whatever its arguments."""

    syscall: str
    errno: int


@dataclass(frozen=True)
class _RefuseIfAnyBit:
    """Refuse when the argument's low word has any bit of ``mask`` set."""

    syscall: str
    arg: int
    mask: int


@dataclass(frozen=True)
class _RefuseIfOneOf:
    """Refuse when the argument's low word equals one of ``values``."""

    syscall: str
    arg: int
    values: tuple[int, ...]


@dataclass(frozen=True)
class _AllowOnlyOneOf:
    """Allow only when the argument's low word equals one of ``values``."""

    syscall: str
    arg: int
    values: tuple[int, ...]


_Rule = _Refuse | _RefuseIfAnyBit | _RefuseIfOneOf | _AllowOnlyOneOf


def _policy(arch: _Arch) -> list[_Rule]:
    rules: list[_Rule] = [
        _Refuse(name, errno.EPERM) for _, names in _REFUSED_OUTRIGHT for name in names
    ]
    # clone3 passes its flags in a struct seccomp cannot read. ENOSYS makes glibc fall
    # back to clone(), whose flags the next rule can check.
    rules.append(_Refuse("clone3", errno.ENOSYS))
    # fork() and threads keep working; only new namespaces are refused.
    rules.append(_RefuseIfAnyBit("clone", arch.clone_flags_arg, _NAMESPACE_FLAGS))
    # Typing into a terminal's input queue from inside reaches whoever reads it outside.
    rules.append(_RefuseIfOneOf("ioctl", 1, (_TIOCSTI, _TIOCLINUX)))
    # Other personas switch off ASLR (ADDR_NO_RANDOMIZE) or make data executable.
    rules.append(_AllowOnlyOneOf("personality", 0, (_PER_LINUX, _PERSONALITY_QUERY)))
    return [rule for rule in rules if rule.syscall in arch.syscalls]


DENIED_SYSCALLS: frozenset[str] = frozenset(
    [name for _, names in _REFUSED_OUTRIGHT for name in names] + ["clone3"]
)
"""Calls refused whatever their arguments (clone3 with ENOSYS, the rest with EPERM).

clone (namespace flags), ioctl (TIOCSTI, TIOCLINUX) and personality (anything but
PER_LINUX and the query) are refused only for those arguments. Some names do not
exist on every architecture (iopl, ioperm, uselib and _sysctl are x86 only).
"""


# --- Classic BPF --------------------------------------------------------------------

# From include/uapi/linux/filter.h and include/uapi/linux/seccomp.h.
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x05 | 0x10  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JGE_K = 0x05 | 0x30  # BPF_JMP | BPF_JGE | BPF_K
_BPF_JSET_K = 0x05 | 0x40  # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_BPF_MAXINSNS = 4096

_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARGS = 16

_NEXT = ""  # a jump target meaning "fall through to the next instruction"


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int
    jt: str = _NEXT  # label jumped to when the test holds
    jf: str = _NEXT  # label jumped to when it does not


class _Program:
    """A straight-line BPF program with named jump targets, resolved by ``assemble``."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"BPF label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self._insns.append(_Insn(_BPF_LD_W_ABS, offset))

    def jump_if_equal(self, value: int, then: str = _NEXT, otherwise: str = _NEXT) -> None:
        self._insns.append(_Insn(_BPF_JEQ_K, value, then, otherwise))

    def jump_if_at_least(self, value: int, then: str = _NEXT, otherwise: str = _NEXT) -> None:
        self._insns.append(_Insn(_BPF_JGE_K, value, then, otherwise))

    def jump_if_any_bit(self, mask: int, then: str = _NEXT, otherwise: str = _NEXT) -> None:
        self._insns.append(_Insn(_BPF_JSET_K, mask, then, otherwise))

    def ret(self, action: int) -> None:
        self._insns.append(_Insn(_BPF_RET_K, action))

    def assemble(self, byteorder: str) -> bytes:
        sock_filter = struct.Struct(("<" if byteorder == "little" else ">") + "HBBI")
        out = bytearray()
        for index, insn in enumerate(self._insns):
            jt = self._offset(index, insn.jt)
            jf = self._offset(index, insn.jf)
            out += sock_filter.pack(insn.code, jt, jf, insn.k)
        if len(self._insns) > _BPF_MAXINSNS:
            raise ValueError(f"seccomp program has {len(self._insns)} instructions")
        return bytes(out)

    def _offset(self, index: int, label: str) -> int:
        if label == _NEXT:
            return 0
        offset = self._labels[label] - index - 1
        if not 0 <= offset <= 0xFF:  # classic BPF jumps only forward, by a u8
            raise ValueError(f"BPF jump to {label!r} out of range ({offset})")
        return offset


def _low_word(arch: _Arch, arg: int) -> int:
    return _OFFSET_ARGS + 8 * arg + (0 if arch.byteorder == "little" else 4)


def _compile(arch: _Arch, rules: Iterable[_Rule]) -> bytes:
    rules = list(rules)
    syscalls = [rule.syscall for rule in rules]
    if len(set(syscalls)) != len(syscalls):
        raise ValueError("seccomp policy names a syscall twice")
    returns = {errno.EPERM: "eperm", errno.ENOSYS: "enosys"}

    prog = _Program()
    prog.load(_OFFSET_ARCH)
    prog.jump_if_equal(arch.audit_arch, then="native")
    prog.ret(_SECCOMP_RET_KILL_PROCESS)
    prog.label("native")
    prog.load(_OFFSET_NR)
    if arch.foreign_abi_floor is not None:
        prog.jump_if_at_least(arch.foreign_abi_floor, then="enosys")
    # Dispatch on the syscall number; argument checks live in blocks after it.
    for rule in rules:
        number = arch.syscalls[rule.syscall]
        target = returns[rule.errno] if isinstance(rule, _Refuse) else rule.syscall
        prog.jump_if_equal(number, then=target)
    prog.ret(_SECCOMP_RET_ALLOW)

    for rule in rules:
        if isinstance(rule, _Refuse):
            continue
        prog.label(rule.syscall)
        prog.load(_low_word(arch, rule.arg))
        if isinstance(rule, _RefuseIfAnyBit):
            prog.jump_if_any_bit(rule.mask, then="eperm")
            prog.ret(_SECCOMP_RET_ALLOW)
        elif isinstance(rule, _RefuseIfOneOf):
            for value in rule.values:
                prog.jump_if_equal(value, then="eperm")
            prog.ret(_SECCOMP_RET_ALLOW)
        else:
            for value in rule.values:
                prog.jump_if_equal(value, then="allow")
            prog.ret(_SECCOMP_RET_ERRNO | errno.EPERM)

    prog.label("eperm")
    prog.ret(_SECCOMP_RET_ERRNO | errno.EPERM)
    prog.label("enosys")
    prog.ret(_SECCOMP_RET_ERRNO | errno.ENOSYS)
    prog.label("allow")
    prog.ret(_SECCOMP_RET_ALLOW)
    return prog.assemble(arch.byteorder)


# --- Public API ---------------------------------------------------------------------


def _resolve_arch(arch: str | None) -> _Arch:
    machine = (arch or platform.machine()).lower()
    machine = _ARCH_ALIASES.get(machine, machine)
    try:
        return _ARCHES[machine]
    except KeyError:
        supported = ", ".join(sorted(_ARCHES))
        raise IsolationUnavailable(
            f"no seccomp filter for the {machine!r} architecture (supported: {supported}); "
            "use the microVM backend on this host"
        ) from None


@functools.cache
def _build_for(name: str) -> bytes:
    arch = _ARCHES[name]
    return _compile(arch, _policy(arch))


def build_filter(arch: str | None = None) -> bytes:
    """The compiled seccomp program: an array of ``struct sock_filter`` for ``arch``.

    ``arch`` defaults to the host's. Raises IsolationUnavailable for an architecture
    without a syscall table here.
    """
    return _build_for(_resolve_arch(arch).name)


def filter_fd(arch: str | None = None) -> int:
    """A readable file descriptor holding the program, positioned at its start.

    Pass it to ``bwrap --seccomp FD`` (with ``pass_fds``); bubblewrap reads it to the
    end, so each sandbox needs a fresh one. The caller closes it. The descriptor is
    close-on-exec in this process and sealed against writes.
    """
    program = build_filter(arch)
    if not hasattr(os, "memfd_create"):
        raise IsolationUnavailable("this platform has no memfd_create; seccomp needs Linux")
    return data_fd("corral-seccomp", program)

"""The guest agent: runs inside every sandbox and serves the host over one framed stream.

Started by the host as ``python3 -I -S agent.py --workdir /workspace`` (or by importing
this module and calling `main`). It reads frames from stdin, writes frames to stdout
(see `protocol` for the wire format) and keeps stderr for diagnostics. `Agent` takes two
file descriptors, so another transport (vsock) only needs another `main`.

Standard library only, Python 3.9 syntax, and quick to start: it is on the critical path
of every sandbox creation, so it avoids ``subprocess``, ``selectors``, ``json``, ``signal``
(all pull in ``re`` or ``enum``) and uses ``posix_spawn``, ``epoll`` and ``_signal``.

The agent is the modules beside this one, copied into each sandbox together
(`corral.guest.AGENT_FILES`): `agent_channels` (what every call shares), `agent_exec`
(exec, attach, signal, resize, ps), `agent_command` (one running command), `agent_pty`
(the terminal of a PTY command), `agent_files` (read, write, list, stat, mkdir, remove),
`agent_move` (rename), `agent_connect` (connect) and `agent_sudo` (sudo for the
sandbox's own processes, over a unix socket). This module is the loop: frames in,
dispatch to the calls, frames out, timers and reaping.

Choices worth knowing (the modules of the calls say theirs):

* As the pid namespace's init, the agent gets from inside the sandbox only the signals
  it has a handler for; it keeps one for SIGCHLD alone (Python's SIGINT handler would
  turn ``kill -INT 1`` into a KeyboardInterrupt).
* The agent reaps every child with ``waitpid(-1)``, so it can serve as PID 1.
* File operations never block the loop, and a rename across mounts is a copy made a slice
  of time per turn of the loop (`agent_move`).
* After ``detach`` (the host checkpoints the sandbox next) the host's stream is waited on
  with ``poll``, not epoll, until input comes: then on the new stream of a restore. An
  epoll registration of a host descriptor made before gVisor's checkpoint never fires
  after its restore; ``poll`` does, and so does a registration made anew.
"""

from __future__ import annotations

import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from corral.guest import agent_files, agent_move, agent_sudo, agent_watch
    from corral.guest.agent_channels import Args, Channel
    from corral.guest.agent_command import Command

    Op = Callable[["Agent", int, Args], None]

try:
    from corral.guest import agent_exec, protocol
    from corral.guest.agent_channels import (
        EPOLLIN,
        EPOLLOUT,
        Refusal,
        guest_module,
        refusal_from_os_error,
        signal,
    )
except ImportError:  # run in a sandbox, beside this file
    import agent_exec  # type: ignore[no-redef,import-not-found]
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import (  # type: ignore[no-redef,import-not-found]
        EPOLLIN,
        EPOLLOUT,
        Refusal,
        guest_module,
        refusal_from_os_error,
        signal,
    )

# How many times a killed process group is swept again before the agent gives up (~10 s).
SWEEP_ATTEMPTS = 30
OUTPUT_HIGH_WATER = 1 << 20  # stop pumping files to the host while this much is unsent


class Agent:
    """The agent's event loop: frames in on `rfd`, frames out on `wfd`, children between."""

    def __init__(
        self,
        rfd: int,
        wfd: int,
        workdir: str,
        oom: agent_exec.OomScore,
        users: agent_exec.Users | None = None,
    ) -> None:
        hide_inherited_fds()
        if wfd == rfd:  # a socket: watch each direction on its own descriptor
            wfd = os.dup(rfd)
        self.rfd = rfd
        self.wfd = wfd
        self.workdir = workdir
        self.poller = select.epoll()
        self.handlers: dict[int, Callable[[int, int], Any]] = {}
        self.decoder = protocol.FrameDecoder()
        self.out = bytearray()
        self.channels: dict[int, Channel] = {}
        self.commands: dict[int, Command] = {}
        # Killed process groups still to sweep: pgid -> (when next, attempts so far).
        self.sweeps: dict[int, tuple[float, int]] = {}
        self.downloads: list[agent_files.FileDownload] = []
        self.moves: list[agent_move.Move] = []
        self.watches: list[agent_watch.Watch] = []
        self.base_env = dict(os.environ)
        self.users = users or agent_exec.Users(None)
        # Whom file operations act as now: the default user, or the user a call names.
        self.acting = self.users.default
        self.exit_code: int | None = None
        self.oom = oom
        # After `detach`: a poll of the epoll and the host's stream (see the docstring).
        self.detached: select.poll | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.signal(signal.SIGCHLD, _wake)
        # Python's own SIGINT handler raises KeyboardInterrupt: without it, the kernel
        # drops the SIGINT sandbox code sends its pid namespace's init (this agent).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.watch(self.wake_r, EPOLLIN, self.on_children)
        self.watch(rfd, EPOLLIN, self.on_input)
        # sudo for the sandbox's processes, where there is a root to become.
        self.sudo: agent_sudo.SudoServer | None = None
        if self.users.root:
            try:
                self.sudo = guest_module("agent_sudo").SudoServer(self)
            except OSError as exc:
                os.write(2, f"corral-agent: no sudo in this sandbox: {exc}\n".encode())

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        while self.exit_code is None:
            for fd, events in self.wait(self.next_timeout()):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(fd, events)
            self.run_timers()
            if len(self.out) < OUTPUT_HIGH_WATER:
                for download in [d for d in self.downloads if d.ready]:
                    download.pump()
            for move in list(self.moves):
                self.as_user(move.ids, move.pump)
            self.flush()
        for command in list(self.commands.values()):
            if not command.background:
                command.kill(None)
        return self.exit_code

    def wait(self, timeout: float) -> list[tuple[int, int]]:
        """The descriptors ready within `timeout` seconds (-1: no limit) and their events."""
        if self.detached is not None:
            ready = self.detached.poll(None if timeout < 0 else timeout * 1000)
            if any(fd == self.rfd for fd, _events in ready):
                self.detached = None  # a new connection: its stream in the epoll anew
                self.watch(self.rfd, EPOLLIN, self.on_input)
            timeout = 0
        return self.poller.poll(timeout)

    def detach(self) -> None:
        """Wait on the host's stream with `poll` from now on (see the module docstring)."""
        self.unwatch(self.rfd)
        self.detached = select.poll()
        self.detached.register(self.poller.fileno(), select.POLLIN)
        self.detached.register(self.rfd, select.POLLIN)

    def next_timeout(self) -> float:
        if self.moves or (
            len(self.out) < OUTPUT_HIGH_WATER and any(d.ready for d in self.downloads)
        ):
            return 0
        soonest = None
        for command in self.commands.values():
            for when in (command.deadline if command.running else None, command.grace_at):
                if when and (soonest is None or when < soonest):
                    soonest = when
        for when, _attempt in self.sweeps.values():
            if soonest is None or when < soonest:
                soonest = when
        if soonest is None:
            return -1
        return max(0.0, soonest - time.monotonic())

    def sweep(self, pgid: int) -> None:
        """SIGKILL a process group now and again until it is empty.

        One killpg can miss children forked while it is delivered (a fork bomb); they
        stay in the group, so repeating it until ESRCH gets them all, even after the
        command's own process has died.
        """
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            self.sweeps.pop(pgid, None)
            return
        attempt = self.sweeps.get(pgid, (0.0, 0))[1] + 1
        if attempt > SWEEP_ATTEMPTS:
            self.sweeps.pop(pgid, None)
            return
        self.sweeps[pgid] = (time.monotonic() + min(0.005 * 2**attempt, 0.5), attempt)

    def run_timers(self) -> None:
        now = time.monotonic()
        for pgid, (when, _attempt) in list(self.sweeps.items()):
            if when <= now:
                self.sweep(pgid)
        for command in list(self.commands.values()):
            if command.deadline is not None and command.deadline <= now and command.running:
                command.deadline = None
                command.kill("timeout")
            if command.grace_at and command.grace_at <= now:
                command.drain_after_grace()

    def watch(self, fd: int, events: int, handler: Callable[[int, int], Any]) -> None:
        if fd in self.handlers:
            self.poller.modify(fd, events)
        else:
            self.poller.register(fd, events)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def on_children(self, fd: int, events: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            command = self.commands.get(pid)
            if command is not None:
                command.exited(status)
            elif self.sudo is not None:
                self.sudo.exited(pid, status)

    # -- frames in --------------------------------------------------------------------

    def on_input(self, fd: int, events: int) -> None:
        try:
            data = os.read(fd, 1 << 18)
        except BlockingIOError:
            return
        except OSError as exc:
            self.stop(0, f"reading from the host failed ({exc}); exiting")
            return
        if not data:
            self.stop(0)
            return
        try:
            self.dispatch(self.decoder.feed(data))
        except protocol.ProtocolError as exc:
            self.stop(2, f"protocol error: {exc}; exiting")

    def dispatch(self, frames: list[tuple[int, int, bytes]]) -> None:
        for kind, channel, payload in frames:
            if kind == protocol.CALL:
                if channel in self.channels:
                    raise protocol.ProtocolError(f"CALL on open channel {channel}")
                self.call(channel, payload)
                continue
            target = self.channels.get(channel)
            if kind == protocol.IN:
                if target is not None:
                    target.on_in(payload)
            elif kind == protocol.EOF:
                if target is not None:
                    target.on_eof()
            elif kind == protocol.CREDIT:
                amount = protocol.decode_credit(payload)
                if target is not None:
                    target.on_credit(amount)
            elif kind == protocol.CLOSE:
                if target is not None:
                    del self.channels[channel]
                    target.on_close()
            else:
                raise protocol.ProtocolError(f"the host sent a {protocol.KIND_NAMES[kind]} frame")

    def call(self, channel: int, payload: bytes) -> None:
        try:
            try:
                args = protocol.decode_json(payload)
            except ValueError as exc:
                raise Refusal("invalid_argument", f"CALL payload is not JSON: {exc}") from None
            if not isinstance(args, dict):
                raise Refusal("invalid_argument", "CALL payload must be a JSON object")
            op = args.get("op")
            handler = find_op(op) if isinstance(op, str) else None
            if handler is None:
                known = ", ".join(sorted([*OPS, *LATER_OPS]))
                raise Refusal(
                    "unsupported",
                    f"unknown op {op!r}: this agent (protocol {protocol.VERSION}) knows {known}",
                    unknown_op=str(op),
                )
            if self.watches:  # changes made before this call are reported before its reply
                guest_module("agent_watch").drain_all(self)
            if op in FILE_OPS and args.get("user") is not None:
                self.as_user(self.users.lookup(args["user"]), handler, self, channel, args)
            else:
                handler(self, channel, args)
        except Refusal as refusal:
            self.reply_error(channel, refusal)
        except OSError as exc:
            self.reply_error(channel, refusal_from_os_error(exc))
        except (ValueError, TypeError) as exc:
            self.reply_error(channel, Refusal("invalid_argument", str(exc)))
        except Exception as exc:
            import traceback

            traceback.print_exc()
            self.reply_error(channel, Refusal("internal", f"the agent failed: {exc!r}"))

    # -- frames out -------------------------------------------------------------------

    def send(self, kind: int, channel: int, payload: bytes = b"") -> None:
        self.out += protocol.encode_header(kind, channel, len(payload))
        self.out += payload

    def send_json(self, kind: int, channel: int, value: Any) -> None:
        self.send(kind, channel, protocol.encode_json(value))

    def reply(self, channel: int, value: Args) -> None:
        self.channels.pop(channel, None)
        payload = protocol.encode_json(value)
        if len(payload) > protocol.MAX_PAYLOAD:
            refusal = Refusal("internal", f"the reply was {len(payload)} bytes, too big to send")
            self.reply_error(channel, refusal)
            return
        self.send(protocol.REPLY, channel, payload)

    def reply_error(self, channel: int, refusal: Refusal) -> None:
        error = {"type": refusal.kind, "message": str(refusal)}
        if refusal.unknown_op is not None:  # the host is newer than this agent
            error["unknown_op"] = refusal.unknown_op
        self.reply(channel, {"ok": False, "error": error})

    def grant(self, channel: int, amount: int) -> None:
        if amount:
            self.send(protocol.CREDIT, channel, protocol.encode_credit(amount))

    def flush(self, fd: int = -1, events: int = 0) -> None:
        out = self.out
        try:
            while out:
                del out[: os.write(self.wfd, out)]
        except BlockingIOError:
            if self.wfd not in self.handlers:
                self.watch(self.wfd, EPOLLOUT, self.flush)
            return
        except OSError:
            out.clear()
            self.stop(0)
        self.unwatch(self.wfd)

    def stop(self, code: int, message: str | None = None) -> None:
        if message:
            os.write(2, f"corral-agent: {message}\n".encode())
        if self.exit_code is None:
            self.exit_code = code

    # -- arguments --------------------------------------------------------------------

    def path(self, args: Args, key: str = "path") -> str:
        """An absolute path: relative ones from the workdir, or with ``home`` from the
        home directory of the user the call acts as."""
        value = args.get(key)
        if not isinstance(value, str) or not value:
            raise Refusal("invalid_argument", f"{key} must be a non-empty string")
        if "\0" in value:
            raise Refusal("invalid_argument", f"{key} {value!r} contains a NUL byte")
        base = self.acting.home if args.get("home") else self.workdir
        return os.path.normpath(os.path.join(base, value))

    def as_user(self, ids: agent_exec.Identity, work: Callable[..., Any], *args: Any) -> Any:
        """Run `work` with the file-system ids of `ids`: the kernel checks that user's
        permissions and what it creates is its own. The ids in force before come back."""
        previous = self.acting
        if ids is previous:
            return work(*args)
        self.acting = ids
        self.users.files_as(ids)
        try:
            return work(*args)
        finally:
            self.acting = previous
            self.users.files_as(previous)

    def user(self) -> str:
        """The user commands run as by default."""
        return self.users.default.name


def op_ping(agent: Agent, channel: int, args: Args) -> None:
    agent.reply(
        channel,
        {
            "ok": True,
            "version": protocol.VERSION,
            "pid": os.getpid(),
            "uid": agent.users.default.uid,
            "user": agent.user(),
            "workdir": agent.workdir,
        },
    )


def op_detach(agent: Agent, channel: int, args: Args) -> None:
    """The host is about to checkpoint the sandbox and will talk to this agent over a new
    connection after a restore: let go of every other call as if the host had closed it
    (a foreground command dies, a background one goes on for whoever attaches next),
    so nothing of this connection is left in the new one. The host sends nothing after
    this call, so its reply is the last frame of the connection."""
    for number in [n for n in agent.channels if n != channel]:
        agent.channels.pop(number).on_close()
    agent.reply(channel, {"ok": True})
    agent.detach()


# Every call the agent answers: op name -> function(agent, channel, args).
OPS: dict[str, Op] = {
    "ping": op_ping,
    "detach": op_detach,
    "exec": agent_exec.op_exec,
    "attach": agent_exec.op_attach,
    "signal": agent_exec.op_signal,
    "input": agent_exec.op_input,
    "resize": agent_exec.op_resize,
    "ps": agent_exec.op_ps,
}
# And the calls whose module (op name -> the module's name, which has `op_<name>`) is
# imported at the first of them (`find_op`): none is a new sandbox's first call, so the
# agent's start, on the critical path of every creation, does without them.
LATER_OPS = {
    "read": "agent_files",
    "write": "agent_files",
    "list": "agent_files",
    "stat": "agent_files",
    "mkdir": "agent_files",
    "remove": "agent_files",
    "rename": "agent_move",
    "connect": "agent_connect",
    "watch": "agent_watch",
}
# The calls that touch files: ``user`` makes them act as that user (`Agent.as_user`).
FILE_OPS = frozenset(("read", "write", "list", "stat", "mkdir", "remove", "rename", "watch"))


def find_op(op: str) -> Op | None:
    """The function answering the call `op`, importing its module at its first call."""
    handler = OPS.get(op)
    if handler is None and op in LATER_OPS:
        handler = OPS[op] = getattr(guest_module(LATER_OPS[op]), f"op_{op}")
    return handler


def _wake(signum: int, frame: object) -> None:
    """SIGCHLD handler: the work happens when the wakeup fd makes epoll return."""


def hide_inherited_fds() -> None:
    """Mark every descriptor above stderr close-on-exec, so no command inherits one.

    posix_spawn has no close_fds; the agent's own descriptors are close-on-exec already
    (Python's default), but those it inherited from its launcher may not be.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.set_inheritable(fd, False)
            except OSError:  # the descriptor listdir itself used
                pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    workdir = os.getcwd()
    default: tuple[int, int] | None = None  # run as root: the commands' default uid, gid
    for i, arg in enumerate(args):
        if arg == "--workdir" and i + 1 < len(args):
            workdir = args[i + 1]
        elif arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--user" and i + 1 < len(args):
            uid, _, gid = args[i + 1].partition(":")
            default = (int(uid), int(gid or uid))
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as exc:
        os.write(2, f"corral-agent: cannot use workdir {workdir}: {exc}\n".encode())
        sys.exit(2)
    try:
        oom = agent_exec.OomScore.open()  # before _refuse_inspection: see OomScore
    except OSError as exc:
        os.write(
            2,
            f"corral-agent: cannot set oom_score_adj ({exc}), so commands would not be the "
            "OOM killer's first choice; refusing to start\n".encode(),
        )
        sys.exit(2)
    _refuse_inspection()
    try:
        users = agent_exec.Users(default)
    except (OSError, KeyError) as exc:
        os.write(2, f"corral-agent: cannot take the default user: {exc}\n".encode())
        sys.exit(2)
    sys.exit(Agent(0, 1, workdir, oom, users).run())


def _refuse_inspection() -> None:
    """Make the agent non-dumpable, so code in the sandbox cannot tamper with it.

    Sandbox code runs as the agent's uid; without this it could open /proc/1/mem to
    rewrite the agent, or /proc/1/fd/1 to forge frames to the host. A non-dumpable
    process's /proc entries belong to root, which the sandbox does not have. (Yama would
    also stop it, but many hosts don't enable Yama.) Children are dumpable again after
    exec, as usual. ctypes costs ~3 ms of start-up; there is no stdlib prctl.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, SUID_DUMP_DISABLE
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (ImportError, OSError) as exc:
        os.write(2, f"corral-agent: cannot make itself non-dumpable: {exc}\n".encode())


if __name__ == "__main__":
    main()

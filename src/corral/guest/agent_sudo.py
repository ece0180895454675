"""sudo inside a sandbox: the guest agent runs a command as root (or `-u USER`) for a
process of the sandbox that asks.

A setuid sudo cannot work in a sandbox: bubblewrap sets no_new_privs, so exec never
raises privileges. The agent is the sandbox's root already (root mode: `agent_exec.Users`)
and starts every command as its user; sudo is one more way to ask it. The client
(`sudo.py`, /usr/bin/sudo in the `base` template) connects to an abstract unix socket
(`SOCKET`), which exists only in the sandbox's own network namespace, so only the
sandbox's processes reach it, and sends one message: the program, argv, env and cwd it
wants, with its stdin, stdout and stderr as SCM_RIGHTS descriptors. The agent checks the
caller with SO_PEERCRED: a process of its pid namespace (pid 0 is one outside it) whose
uid is root or a member of the group `sudo` (E2B's `user` is, without a password, like
its `NOPASSWD: ALL`). The command then runs in a session of its own with the caller's
descriptors; the agent answers `{"pid"}`, then `{"exit", "signal"}` when it ends.
Signals the client gets are relayed (`{"signal"}`); if the client goes (killed with its
command, or its connection dropped) the command's process group is killed too.

What it gives is exactly a `user="root"` command's: the sandbox's root with the agent's
few capabilities, in the sandbox's namespaces, under its seccomp filter. Without root
(one id only) the agent does not listen and the client says so.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from typing import Any

    from corral.guest.agent import Agent

try:
    from corral.guest import protocol
    from corral.guest.agent_channels import EPOLLIN, Refusal, signal
    from corral.guest.agent_exec import groups_of
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import EPOLLIN, Refusal, signal  # type: ignore[no-redef,import-not-found]
    from agent_exec import groups_of  # type: ignore[no-redef,import-not-found]

SOCKET = b"\0corral-sudo"  # abstract: scoped to the sandbox's network namespace
GROUP = "sudo"
MAX_CLIENTS = 64  # at once; more are refused, so a loop of sudo cannot exhaust the agent's fds
MAX_MESSAGE = 1 << 20
_FDS = 3  # stdin, stdout, stderr
# Linux's SO_PEERCRED answer: pid, uid, gid as three ints.
_CRED_SIZE = 12


class SudoServer:
    """The agent's listening socket and the sudo calls in flight."""

    def __init__(self, agent: Agent) -> None:
        import _socket

        self.agent = agent
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sock.bind(SOCKET)
        self.sock.listen(16)
        self.clients: dict[int, SudoCall] = {}  # by connection fd
        self.children: dict[int, SudoCall] = {}  # by the command's pid
        agent.watch(self.sock.fileno(), EPOLLIN, self.on_accept)

    def on_accept(self, fd: int, events: int) -> None:
        import _socket

        while True:
            try:
                # _socket has no accept(): _accept gives a close-on-exec descriptor.
                accepted, _ = self.sock._accept()  # type: ignore[attr-defined]
                conn = _socket.socket(fileno=accepted)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors: the client sees its connection refused
            conn.setblocking(False)
            call = SudoCall(self, conn)
            if len(self.clients) >= MAX_CLIENTS:
                call.fail(f"{MAX_CLIENTS} sudo commands run already; wait for one to end")
                continue
            self.clients[conn.fileno()] = call
            self.agent.watch(conn.fileno(), EPOLLIN, call.on_message)

    def exited(self, pid: int, status: int) -> bool:
        """A child of the agent ended: True if it was a sudo command (reported)."""
        call = self.children.pop(pid, None)
        if call is None:
            return False
        call.finish(status)
        return True


class SudoCall:
    """One client: its request, the command it started, its end."""

    def __init__(self, server: SudoServer, conn: _socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.fd = conn.fileno()
        self.pid: int | None = None

    def on_message(self, fd: int, events: int) -> None:
        import _socket

        try:
            data, ancillary, _flags, _ = self.conn.recvmsg(
                MAX_MESSAGE, _socket.CMSG_SPACE(_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        fds = _received_fds(ancillary)
        try:
            if not data:  # the client is gone: so is its command
                self.close()
                return
            message = protocol.decode_json(data)
            if not isinstance(message, dict):
                raise Refusal("invalid_argument", "a sudo message is a JSON object")
            if self.pid is None:
                self.start(message, fds)
            elif isinstance(message.get("signal"), int) and 0 < message["signal"] < 65:
                os.kill(self.pid, message["signal"])
        except Refusal as refusal:
            self.fail(str(refusal))
        except (ValueError, TypeError) as exc:
            self.fail(f"invalid request: {exc}")
        except OSError as exc:
            self.fail(exc.strerror or str(exc))
        finally:
            for received in fds:
                os.close(received)

    def start(self, request: dict[str, Any], fds: list[int]) -> None:
        users = self.server.agent.users
        if len(fds) != _FDS:
            raise Refusal("invalid_argument", "send stdin, stdout and stderr with the request")
        self.authorize()
        program, argv, env, cwd = (request.get(k) for k in ("program", "argv", "env", "cwd"))
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise Refusal("invalid_argument", "argv must be a non-empty list of strings")
        if not isinstance(program, str) or not program.startswith("/"):
            raise Refusal("invalid_argument", "program must be an absolute path")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise Refusal("invalid_argument", "cwd must be an absolute path")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in env.items()
        ):
            raise Refusal("invalid_argument", "env must map names to strings")
        ids = users.lookup(request.get("user") or "root")
        agent = self.server.agent
        users.before_spawn(ids)  # effective root meanwhile: the cwd may be root's own
        try:
            try:
                os.chdir(cwd)
            except OSError as exc:
                reason = f"unable to change directory to {cwd}: {exc.strerror}"
                raise Refusal("not_found", reason) from None
            agent.oom.raise_for_spawn()
            try:
                actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
                pid = os.posix_spawn(
                    program,
                    argv,
                    env,
                    file_actions=actions,
                    setsid=True,  # its own group: killed whole when the client goes
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                    resetids=True,
                )
            finally:
                agent.oom.restore()
        finally:
            users.after_spawn()  # (the agent's own cwd does not matter: `agent_exec.spawn`)
        self.pid = pid
        self.server.children[pid] = self
        self.send({"pid": pid})

    def authorize(self) -> None:
        import _socket
        import grp
        import pwd

        raw = self.conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CRED_SIZE)
        pid, uid, gid = (
            int.from_bytes(raw[i : i + 4], sys.byteorder, signed=True) for i in (0, 4, 8)
        )
        if pid <= 0:  # not a process of this sandbox's pid namespace
            raise Refusal("permission_denied", "sudo is for the sandbox's own processes")
        if uid == 0:
            return
        try:
            name = pwd.getpwuid(uid).pw_name
            allowed = grp.getgrnam(GROUP).gr_gid in groups_of(name, gid)
        except (KeyError, OSError):
            name, allowed = str(uid), False
        if not allowed:
            raise Refusal(
                "permission_denied",
                f"{name} is not in the sudoers file (members of the group {GROUP!r} may sudo)",
            )

    def send(self, message: dict[str, Any]) -> None:
        try:  # noqa: SIM105 (contextlib would slow the agent's start)
            self.conn.send(protocol.encode_json(message))
        except OSError:
            pass  # the client is gone; `on_message` sees it

    def fail(self, message: str) -> None:
        self.send({"error": message})
        self.close()

    def finish(self, status: int) -> None:
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + signum if signum is not None else os.WEXITSTATUS(status)
        self.pid = None
        self.send({"exit": code, "signal": signum})
        self.close()

    def close(self) -> None:
        if self.pid is not None:  # the client went first: its command goes too
            self.server.children.pop(self.pid, None)
            self.server.agent.sweep(self.pid)
            self.pid = None
        if self.server.clients.pop(self.fd, None) is not None:
            self.server.agent.unwatch(self.fd)
        self.conn.close()


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    import _socket

    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds

"""The guest agent's process calls: exec, attach, signal and ps.

Commands run in their own session (process group) with ``oom_score_adj`` 1000, so the
kernel's OOM killer takes them before the agent. ``posix_spawn`` cannot run code in
the child, so the agent raises its own score for the spawn and restores it as soon as
``posix_spawn`` returns: the child inherits 1000 from birth. That is ~2x faster than a
Python ``fork`` with a pre-exec step, and ~2x faster than an extra ``/bin/sh`` exec. The
agent keeps the score it started with: an unprivileged process may not go below the
floor (``oom_score_adj_min``) it inherited, and its children inherit that floor too, so
a lower agent score set with privilege would only let sandbox code lower its own to the
same value (and below the host's processes in a host-wide OOM). An agent that cannot
set the score refuses to start.
"""

from __future__ import annotations

import binascii
import errno
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from corral.guest.agent import Agent
    from corral.guest.agent_channels import Args

try:
    from corral.guest import protocol
    from corral.guest.agent_channels import Refusal, signal
    from corral.guest.agent_command import Command
    from corral.guest.agent_pty import DEFAULT_TERM, open_terminal, set_size, terminal_size
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import Refusal, signal  # type: ignore[no-redef,import-not-found]
    from agent_command import Command  # type: ignore[no-redef,import-not-found]
    from agent_pty import (  # type: ignore[no-redef,import-not-found]
        DEFAULT_TERM,
        open_terminal,
        set_size,
        terminal_size,
    )

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
COMMAND_OOM_SCORE = b"1000"  # the OOM killer's first choice: commands, never the agent


class OomScore:
    """The agent's own ``oom_score_adj``, which its children inherit at spawn.

    Opened before the agent makes itself non-dumpable: after that its /proc files belong
    to root (of the host, unmapped in the sandbox), and the open would be refused. An
    open descriptor stays writable. `open` checks both writes a spawn makes, so an agent
    that could not protect itself refuses to start instead of failing silently later.
    """

    def __init__(self, fd: int, own: bytes) -> None:
        self.fd = fd
        self.own = own

    @classmethod
    def open(cls) -> OomScore:
        fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
        try:
            score = cls(fd, os.read(fd, 16).strip() or b"0")
            os.write(fd, COMMAND_OOM_SCORE)
            score.restore()
        except BaseException:
            os.close(fd)
            raise
        return score

    def raise_for_spawn(self) -> None:
        try:
            os.write(self.fd, COMMAND_OOM_SCORE)
        except OSError as exc:
            reason = f"could not give the command oom_score_adj {COMMAND_OOM_SCORE.decode()}"
            raise Refusal("internal", f"{reason}: {exc}") from None

    def restore(self) -> None:
        """Back to the agent's own score; failing leaves it the OOM killer's first choice,
        so the agent says so and stops (the host then sees its sandbox fail)."""
        try:
            os.write(self.fd, self.own)
        except OSError as exc:
            message = f"corral-agent: cannot restore its oom_score_adj ({exc}); exiting\n"
            os.write(2, message.encode())
            os._exit(3)


def op_exec(agent: Agent, channel: int, args: Args) -> None:
    argv, cmd = args.get("argv"), args.get("cmd")
    if (argv is None) == (cmd is None):
        raise Refusal("invalid_argument", "exec needs exactly one of argv and cmd")
    if cmd is not None:
        if not isinstance(cmd, str):
            raise Refusal("invalid_argument", "cmd must be a string")
        argv = ["/bin/sh", "-c", cmd]
    elif not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise Refusal("invalid_argument", "argv must be a non-empty list of strings")
    _check_number(args, "timeout", float)
    _check_number(args, "output_limit", int)
    tag = args.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise Refusal("invalid_argument", "tag must be a string")
    pty = None if args.get("pty") is None else terminal_size(args["pty"])
    ids = agent.users.lookup(args.get("user"))
    home = ids.home if args.get("home") else None  # E2B's envd: cwd is the user's home
    if args.get("cwd") is None:
        cwd = home or agent.workdir
    else:
        cwd = agent.path(args, "cwd")
        if home is not None and not os.path.isabs(args["cwd"]):
            cwd = os.path.normpath(os.path.join(home, args["cwd"]))
    if not os.path.isdir(cwd):
        if os.path.exists(cwd):
            raise Refusal("not_a_directory", f"working directory {cwd} is not a directory")
        raise Refusal(
            "not_found",
            f"working directory {cwd} does not exist in the sandbox; "
            "create it first or pass an existing cwd",
        )
    env = agent.base_env
    if ids is not agent.users.default:  # its own HOME, USER and LOGNAME, under what it sets
        env = {**env, "HOME": ids.home, "USER": ids.name, "LOGNAME": ids.name}
    if pty is not None:  # what a terminal is, unless the command's env says otherwise
        env = {**env, "TERM": DEFAULT_TERM}
    if args.get("env"):
        env = dict(env)
        for key, value in args["env"].items():
            if value is None:
                env.pop(key, None)
            elif isinstance(value, str):
                env[key] = value
            else:
                raise Refusal("invalid_argument", f"env value of {key} must be a string")
    if cmd is not None and not os.path.exists(argv[0]):
        # A template without a shell (distroless): say so, not just "not found".
        error = "this sandbox has no /bin/sh to run a shell command; run the program as argv"
        not_started(agent, channel, argv[0], 127, error)
        return
    program = find_program(argv[0], env.get("PATH", DEFAULT_PATH), cwd)
    if isinstance(program, int):
        not_started(agent, channel, argv[0], program)
        return
    terminal = None if pty is None else open_terminal(pty, agent.users, ids)
    agent.users.before_spawn(ids)
    try:
        pid, pipes, stdin_fd = spawn(
            agent.oom, program, argv, env, cwd, bool(args.get("stdin")), terminal
        )
    finally:
        agent.users.after_spawn()
        if terminal is not None:
            os.close(terminal[1])  # the command holds the slave now (or failed to start)
    if pid < 0:
        not_started(agent, channel, argv[0], -pid)
        return
    command = Command(agent, channel, pid, args, pipes)
    command.cwd = cwd
    command.stdin_fd = stdin_fd
    command.takes_input = stdin_fd is not None
    if terminal is not None:
        command.tty = terminal[0]
    agent.commands[pid] = command
    agent.channels[channel] = command
    command.start()


def spawn(
    oom: OomScore,
    program: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdin: bool,
    terminal: tuple[int, int, str] | None = None,
) -> tuple[int, dict[int, int], int | None]:
    """posix_spawn a command in its own session; pid < 0 is -(exit code) of a failure.

    With a `terminal` (master, slave, slave's path: `open_terminal`) the command runs on
    it, which takes the master (closed here if the command could not start).
    """
    os.chdir(cwd)  # posix_spawn has no chdir action; the agent's own cwd does not matter
    oom.raise_for_spawn()
    try:
        if terminal is not None:
            return spawn_on_terminal(program, argv, env, terminal)
        return spawn_inheriting_score(program, argv, env, stdin)
    finally:
        oom.restore()


def spawn_on_terminal(
    program: str, argv: list[str], env: dict[str, str], terminal: tuple[int, int, str]
) -> tuple[int, dict[int, int], int | None]:
    """`spawn` on a terminal: output and input both go through its master."""
    master, _slave, path = terminal
    actions: list[tuple[Any, ...]] = [
        # Opened after setsid, without O_NOCTTY: the controlling terminal (agent_pty).
        (os.POSIX_SPAWN_OPEN, 0, path, os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_DUP2, 0, 2),
    ]
    pid = posix_spawn(program, argv, env, actions, (master,))
    if pid < 0:
        return pid, {}, None
    # Input through its own descriptor, so ending it (close_stdin) leaves the output open.
    return pid, {master: protocol.OUT}, os.dup(master)


def posix_spawn(
    program: str, argv: list[str], env: dict[str, str], actions: list[Any], fds: Any
) -> int:
    """posix_spawn in a new session; on failure, closes `fds` and returns -(exit code) a
    shell would give (127 not found, 126 not executable)."""
    try:
        return os.posix_spawn(
            program,
            argv,
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores both
            resetids=True,  # the command's ids (`Users.spawning`): the real ones
        )
    except OSError as exc:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        if exc.errno == errno.ENOENT:
            return -127
        if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
            return -126
        reason = exc.strerror or str(exc)
        raise Refusal("internal", f"could not start {argv[0]}: {reason}") from None


def spawn_inheriting_score(
    program: str, argv: list[str], env: dict[str, str], stdin: bool
) -> tuple[int, dict[int, int], int | None]:
    """`spawn` while the agent holds the command's oom_score_adj."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (None, None)
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
        (os.POSIX_SPAWN_DUP2, in_r, 0)
        if in_r is not None
        else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    ]
    pid = posix_spawn(program, argv, env, actions, (out_r, out_w, err_r, err_w, in_r, in_w))
    if pid < 0:
        return pid, {}, None
    for fd in (out_w, err_w, in_r):
        if fd is not None:
            os.close(fd)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    if in_w is not None:
        os.set_blocking(in_w, False)
    return pid, {out_r: protocol.OUT, err_r: protocol.ERR}, in_w


class Identity:
    """A user commands run as (no NamedTuple: importing typing slows the agent's start)."""

    __slots__ = ("gid", "groups", "home", "name", "uid")

    def __init__(self, uid: int, gid: int, groups: list[int], name: str, home: str) -> None:
        self.uid, self.gid, self.groups, self.name, self.home = uid, gid, groups, name, home


class Users:
    """Who commands run as, and as whom the agent touches files.

    In a root-mode sandbox the agent is the sandbox's root (its own user namespace, a
    few capabilities: `corral.isolation.namespace.ROOT_CAPS`) and each command runs as
    the user it names, the template's default user otherwise. Files are read and written
    as the default user: the agent's file-system ids (fsuid, fsgid) are that user's, so
    the kernel checks its permissions and new files are its own. posix_spawn cannot
    switch users in the child, but it can reset the effective ids to the real ones:
    `spawning` sets the real and saved ids to the command's (effective stays root), the
    child's reset then leaves root behind and its capabilities with it (all its ids
    non-zero), and the agent takes its ids back. The inherited ambient capabilities
    are cleared at start, so a command of `user` starts with none at all.

    Elsewhere (rootless Corral, or an agent not started as root) the agent has one id:
    its own user is the only one.
    """

    def __init__(self, default: tuple[int, int] | None) -> None:
        self.root = default is not None and os.getuid() == 0
        self._libc: Any = None
        if self.root:
            assert default is not None
            import ctypes

            self._libc = ctypes.CDLL(None, use_errno=True)
            # EINVAL: a kernel without ambient capabilities (gVisor's sentry), so none
            # were inherited.
            if self._libc.prctl(47, 4, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_CLEAR_ALL) failed")
            self.default = self._identity(str(default[0]), default[1])
            self._files_as_default()
        else:
            self.default = self._identity(str(os.getuid()), os.getgid())

    def lookup(self, user: object) -> Identity:
        """The identity a command asks for (a name or a uid; None: the default)."""
        if user is None or user in (self.default.name, self.default.uid, str(self.default.uid)):
            return self.default
        if not isinstance(user, (str, int)) or isinstance(user, bool) or user == "":
            raise Refusal("invalid_argument", "user must be a user name or a uid")
        if not self.root:
            raise Refusal(
                "needs_root",
                f"user {user!r} does not exist here: only {self.default.name!r} is available "
                "(a sandbox has root and other users when Corral's server runs as root)",
            )
        try:
            return self._identity(str(user), None)
        except KeyError:
            raise Refusal(
                "unknown_user",
                f"user {user!r} does not exist in this sandbox; its users are "
                f"{', '.join(self.names())} (and the system accounts of its /etc/passwd)",
            ) from None

    @staticmethod
    def names() -> list[str]:
        """The sandbox's people: root and the regular users (uid 1000 up, not nobody)."""
        import pwd

        users = sorted(pwd.getpwall(), key=lambda entry: entry.pw_uid)
        return [u.pw_name for u in users if u.pw_uid == 0 or 1000 <= u.pw_uid < 65534]

    def _identity(self, user: str, gid: int | None) -> Identity:
        import pwd

        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit() or gid is None:
                raise
            return Identity(int(user), gid, [gid], user, "/")
        gid = entry.pw_gid if gid is None else gid
        return Identity(entry.pw_uid, gid, groups_of(entry.pw_name, gid), entry.pw_name,
                        entry.pw_dir or "/")  # fmt: skip

    def _files_as_default(self) -> None:
        if self.default.uid != 0:
            self.files_as(self.default)

    def files_as(self, ids: Identity) -> None:
        """Touch files as `ids` from now on (`Agent.as_user`); one identity: nothing."""
        if self._libc is None:
            return
        os.setgroups(ids.groups)
        self._libc.setfsgid(ids.gid)
        self._libc.setfsuid(ids.uid)

    def before_spawn(self, ids: Identity) -> None:
        """Before a posix_spawn with `resetids`: the child runs as `ids`."""
        if self.root:
            os.setgroups(ids.groups)
            os.setresgid(ids.gid, 0, ids.gid)
            os.setresuid(ids.uid, 0, ids.uid)

    def give_terminal(self, slave: int, ids: Identity) -> None:
        """Make a new terminal's slave the command's user's, who opens it at spawn."""
        # Linux gives a new terminal the agent's file-system user (the default user);
        # gVisor's sentry gives it the effective one (root): its owner is what counts.
        if self.root and os.fstat(slave).st_uid != ids.uid:
            # The agent's fsuid (the default user's) leaves it without CAP_CHOWN: chown
            # as root, then back.
            self._libc.setfsuid(0)
            try:
                os.fchown(slave, ids.uid, -1)
            finally:
                self._files_as_default()

    def after_spawn(self) -> None:
        if self.root:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)
            self._files_as_default()


def groups_of(name: str, gid: int) -> list[int]:
    """The groups of the user `name` whose own group is `gid`: `gid` and those whose
    members /etc/group lists. A sandbox's accounts are files (Corral writes them), so
    this is ``os.getgrouplist`` without loading the NSS modules the template's
    nsswitch.conf names (Debian's systemd module: ~170 syscalls, each a trap into
    gVisor's kernel, and ~0.1 s of an emulated microVM's start), none of which can reach
    its service from inside a sandbox."""
    groups = [gid]  # may repeat below: setgroups takes a list with duplicates
    try:
        with open("/etc/group", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return groups
    for line in lines:
        fields = line.split(":")
        if len(fields) == 4 and fields[2].isdigit() and name in fields[3].split(","):
            groups.append(int(fields[2]))
    return groups


def not_started(agent: Agent, channel: int, name: str, code: int, error: str | None = None) -> None:
    """Report a missing or unexecutable program the way a shell would."""
    if error is None:
        what = "command not found" if code == 127 else "command not executable"
        error = f"{what}: {name}"
    agent.send_json(protocol.EVENT, channel, {"pid": None})
    agent.send(protocol.ERR, channel, f"corral: {error}\n".encode())
    result = {"ok": True, "exit_code": code, "signal": None, "reason": "exited"}
    agent.reply(channel, {**result, "output_bytes": 0, "error": error})


def running_command(agent: Agent, args: Args) -> Command:
    pid = args.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise Refusal("invalid_argument", "pid must be an integer")
    command = agent.commands.get(pid)
    if command is None or not command.running:
        raise Refusal(
            "not_running",
            f"process {pid} is not running: it exited, or this sandbox's agent did not "
            "start it; list running processes with ps",
        )
    return command


def op_attach(agent: Agent, channel: int, args: Args) -> None:
    command = running_command(agent, args)
    if command.attached:
        raise Refusal(
            "invalid_argument",
            f"process {command.pid} is already attached on another channel; detach it first",
        )
    agent.channels[channel] = command
    command.attach(channel)


def op_input(agent: Agent, channel: int, args: Args) -> None:
    """Bytes (`data`, base64) for a running command's stdin, whether or not a channel
    follows it; `close` then ends its stdin. Replied once the bytes are written."""
    command = running_command(agent, args)
    data = args.get("data", "")
    if not isinstance(data, str):
        raise Refusal("invalid_argument", "data must be a base64 string")
    try:
        raw = binascii.a2b_base64(data)
    except binascii.Error:
        raise Refusal("invalid_argument", "data is not valid base64") from None
    if not command.takes_input:
        raise Refusal(
            "invalid_argument",
            f"process {command.pid} was started without stdin; start it with stdin "
            "(or on a pty) to write to it",
        )
    if command.stdin_fd is None or command.stdin_eof:
        raise Refusal("not_running", f"the stdin of process {command.pid} is closed")
    command.feed(raw, channel)
    if args.get("close"):
        command.on_eof()


def op_signal(agent: Agent, channel: int, args: Args) -> None:
    command = running_command(agent, args)
    signum = args.get("signal")
    if not isinstance(signum, int) or not 0 < signum < 65:
        raise Refusal("invalid_argument", f"signal must be a number 1..64, not {signum!r}")
    try:
        if args.get("group"):
            os.killpg(command.pid, signum)
        else:
            os.kill(command.pid, signum)
    except ProcessLookupError:
        raise Refusal("not_running", f"process {command.pid} is not running") from None
    agent.reply(channel, {"ok": True})


def op_resize(agent: Agent, channel: int, args: Args) -> None:
    command = running_command(agent, args)
    cols, rows = terminal_size(args)
    if command.tty is None:
        raise Refusal(
            "invalid_argument",
            f"process {command.pid} has no terminal to resize: start it with a pty",
        )
    if command.tty < 0:
        raise Refusal("not_running", f"process {command.pid} is ending; its terminal is gone")
    try:
        set_size(command.tty, cols, rows)
    except OSError:  # the terminal closed as the command ended
        raise Refusal("not_running", f"process {command.pid} is not running") from None
    agent.reply(channel, {"ok": True})


def op_ps(agent: Agent, channel: int, args: Args) -> None:
    running = [c.describe() for c in agent.commands.values() if c.running]
    agent.reply(channel, {"ok": True, "processes": running})


def _check_number(args: Args, key: str, kind: type) -> None:
    value = args.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Refusal("invalid_argument", f"{key} must be a non-negative number or null")
    if kind is int and not isinstance(value, int):
        raise Refusal("invalid_argument", f"{key} must be an integer or null")


def find_program(name: str, search_path: str, cwd: str) -> str | int:
    """The file to execute for argv[0], or the shell's exit code (127, 126) if none."""
    if "/" in name:
        return os.path.join(cwd, name)
    denied = False
    for directory in search_path.split(":"):
        candidate = os.path.join(cwd, directory or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    return 126 if denied else 127

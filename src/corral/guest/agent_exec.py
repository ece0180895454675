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
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import Refusal, signal  # type: ignore[no-redef,import-not-found]
    from agent_command import Command  # type: ignore[no-redef,import-not-found]

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
    user = args.get("user")
    if user is not None and user not in (agent.user(), os.getuid(), str(os.getuid())):
        raise Refusal(
            "invalid_argument",
            f"user {user} does not exist in this sandbox; only {agent.user()!r} is available",
        )
    cwd = agent.workdir if args.get("cwd") is None else agent.path(args, "cwd")
    if not os.path.isdir(cwd):
        if os.path.exists(cwd):
            raise Refusal("not_a_directory", f"working directory {cwd} is not a directory")
        raise Refusal(
            "not_found",
            f"working directory {cwd} does not exist in the sandbox; "
            "create it first or pass an existing cwd",
        )
    env = agent.base_env
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
    pid, pipes, stdin_fd = spawn(agent.oom, program, argv, env, cwd, bool(args.get("stdin")))
    if pid < 0:
        not_started(agent, channel, argv[0], -pid)
        return
    command = Command(agent, channel, pid, args, pipes)
    command.stdin_fd = stdin_fd
    agent.commands[pid] = command
    agent.channels[channel] = command
    command.start()


def spawn(
    oom: OomScore, program: str, argv: list[str], env: dict[str, str], cwd: str, stdin: bool
) -> tuple[int, dict[int, int], int | None]:
    """posix_spawn a command in its own session; pid < 0 is -(exit code) of a failure."""
    os.chdir(cwd)  # posix_spawn has no chdir action; the agent's own cwd does not matter
    oom.raise_for_spawn()
    try:
        return spawn_inheriting_score(program, argv, env, stdin)
    finally:
        oom.restore()


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
    try:
        pid = os.posix_spawn(
            program,
            argv,
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores both
        )
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd is not None:
                os.close(fd)
        if exc.errno == errno.ENOENT:
            return -127, {}, None
        if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
            return -126, {}, None
        reason = exc.strerror or str(exc)
        raise Refusal("internal", f"could not start {argv[0]}: {reason}") from None
    for fd in (out_w, err_w, in_r):
        if fd is not None:
            os.close(fd)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    if in_w is not None:
        os.set_blocking(in_w, False)
    return pid, {out_r: protocol.OUT, err_r: protocol.ERR}, in_w


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

"""Corral's sudo: asks the sandbox's guest agent to run a command as root (or -u USER).

The `base` template's /usr/bin/sudo runs this file with the template's python3 (it lives
beside the agent, at /.corral/sudo.py, so it always speaks the running agent's protocol;
see `agent_sudo` for the agent's side and what it checks). It takes the options scripts
use: -u USER, -E / --preserve-env[=LIST], -H, -i, -s, -n, -S, -k, -K, -v, -l, -V, -h and
`NAME=value` assignments before the command; anything else is refused, saying so. There
is never a password: the sandbox's `sudo` group may sudo, as E2B's `user` does.

Standard library only, Python 3.9 syntax; not imported by Corral itself. It is on the
path of every `sudo`, so it imports what the agent does (`_socket`, `_signal`, the
agent's `protocol` for JSON), not `socket`, `signal`, `json` or `shlex` (they pull in
`enum` and `re`).
"""

from __future__ import annotations

import _socket as socket
import os
import pwd
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal  # the C module: `signal` itself imports enum

try:
    from corral.guest.protocol import decode_json, encode_json
except ImportError:  # in a sandbox, beside the agent's files (-I leaves their dir off the path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from protocol import decode_json, encode_json  # type: ignore[no-redef,import-not-found]

SOCKET = "\0corral-sudo"  # the agent's (agent_sudo.SOCKET)
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Characters a -i/-s command's words keep unescaped (sudo backslash-escapes the rest).
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-$")
# What sudo's env_reset keeps of the caller's environment (the rest is dropped).
KEPT = ("TERM", "COLORTERM", "DISPLAY", "XAUTHORITY", "LANG", "LANGUAGE", "TZ", "COLORS",
        "LS_COLORS")  # fmt: skip
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)  # fmt: skip
USAGE = """usage: sudo [-EHinSsk] [-u user] [--preserve-env[=list]] [VAR=value] command [args]
       sudo -i | -s [-u user]          a login shell | a shell, as the user
       sudo -v | -k | -K | -l | -V | -h
Corral's sudo: the sandbox's guest agent runs the command (no password)."""


class Refused(Exception):
    pass


def parse(args: list[str]) -> dict[str, object]:
    """The options, assignments and command of sudo's argv; Refused on what we lack."""
    opts: dict[str, object] = {"user": "root", "preserve": None, "mode": "run"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        i += 1
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "user":
                if not eq:
                    if i >= len(args):
                        raise Refused("option --user needs a user name")
                    value, i = args[i], i + 1
                opts["user"] = value
            elif name == "preserve-env":
                opts["preserve"] = value.split(",") if eq else True
            elif name in ("login", "shell", "validate", "list", "version", "help"):
                opts["mode"] = {"validate": "noop"}.get(name, name)
            elif name in ("non-interactive", "set-home", "stdin", "reset-timestamp"):
                pass
            elif name == "remove-timestamp":
                opts["mode"] = "noop"
            else:
                raise Refused(f"option --{name} is not supported by Corral's sudo")
            continue
        letters = arg[1:]
        for index, letter in enumerate(letters):
            if letter == "u":
                value = letters[index + 1 :]
                if not value:
                    if i >= len(args):
                        raise Refused("option -u needs a user name")
                    value, i = args[i], i + 1
                opts["user"] = value
                break
            if letter == "E":
                opts["preserve"] = True
            elif letter in "HnSk":
                pass  # home is the target's; never a password to ask or remember
            elif letter in "vK":
                opts["mode"] = "noop"
            else:
                modes = {"i": "login", "s": "shell", "l": "list", "V": "version", "h": "help"}
                if letter not in modes:
                    raise Refused(
                        f"option -{letter} is not supported by Corral's sudo (it takes "
                        "-u, -E, -H, -i, -s, -n, -S, -k, -K, -v, -l, -V, -h)"
                    )
                opts["mode"] = modes[letter]
    assignments = {}
    while i < len(args) and "=" in args[i] and not args[i].startswith("="):
        name, _, value = args[i].partition("=")
        if not name.replace("_", "a").isalnum():
            break
        assignments[name] = value
        i += 1
    opts["env"] = assignments
    opts["command"] = args[i:]
    return opts


def target(name: str) -> pwd.struct_passwd:
    try:
        if name.startswith("#") and name[1:].isdigit():
            return pwd.getpwuid(int(name[1:]))
        return pwd.getpwnam(name)
    except KeyError:
        raise Refused(f"unknown user {name}") from None


def environment(opts: dict[str, object], user: pwd.struct_passwd, command: str) -> dict[str, str]:
    preserve = opts["preserve"]
    if preserve is True:
        env = dict(os.environ)
    else:
        names = set(KEPT) | set(preserve if isinstance(preserve, list) else ())
        env = {k: v for k, v in os.environ.items() if k in names or k.startswith("LC_")}
    caller = pwd.getpwuid(os.getuid())
    env.update(
        PATH=SECURE_PATH,
        HOME=user.pw_dir,
        USER=user.pw_name,
        LOGNAME=user.pw_name,
        SHELL=user.pw_shell or "/bin/sh",
        MAIL=f"/var/mail/{user.pw_name}",
        SUDO_USER=caller.pw_name,
        SUDO_UID=str(caller.pw_uid),
        SUDO_GID=str(os.getgid()),
        SUDO_COMMAND=command,
    )
    assert isinstance(opts["env"], dict)
    env.update(opts["env"])
    return env


def find(program: str, path: str) -> str:
    if "/" in program:
        return os.path.abspath(program)
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise Refused(f"{program}: command not found")


def shell_words(words: list[str]) -> str:
    """A command for `shell -c`, as sudo -i and -s pass it: each character but letters,
    digits, `_`, `-` and `$` backslash-escaped, words joined by spaces."""
    return " ".join("".join(c if c in _PLAIN else "\\" + c for c in word) for word in words)


def request(opts: dict[str, object]) -> dict[str, object]:
    """What to ask the agent for."""
    user = target(str(opts["user"]))
    command = opts["command"]
    assert isinstance(command, list)
    shell = user.pw_shell or "/bin/sh"
    cwd = os.getcwd()
    if opts["mode"] == "login":
        argv = [shell, "-l"] + (["-c", shell_words(command)] if command else [])
        cwd = user.pw_dir
    elif opts["mode"] == "shell":
        shell = os.environ.get("SHELL") or shell
        argv = [shell] + (["-c", shell_words(command)] if command else [])
    elif not command:
        raise Refused(USAGE)
    else:
        argv = list(command)
    env = environment(opts, user, " ".join(argv))  # sudo's SUDO_COMMAND: words and spaces
    return {
        "program": find(argv[0], env["PATH"]),
        "argv": argv,
        "env": env,
        "cwd": cwd if os.path.isdir(cwd) else "/",
        "user": user.pw_name,
    }


def run(ask: dict[str, object]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(SOCKET)
    except OSError:
        raise Refused(
            "this sandbox has one user only: Corral's server does not run as root here, "
            "so there is no root to become; run the command without sudo"
        ) from None
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # closed: the command gets /dev/null there
            fds.append(os.open(os.devnull, os.O_RDWR))
    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    conn.sendmsg([encode_json(ask)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    def relay(signum: int, frame: object) -> None:
        try:  # noqa: SIM105 (contextlib would slow sudo's start)
            conn.send(encode_json({"signal": signum}))
        except OSError:  # the agent is gone: recv says so
            pass

    for signum in RELAYED:
        signal.signal(signum, relay)
    while True:
        data = conn.recv(1 << 16)
        if not data:
            raise Refused("the guest agent ended the command without its exit status")
        answer = decode_json(data)
        if "error" in answer:
            raise Refused(answer["error"])
        if "exit" in answer:
            if answer.get("signal"):
                signal.signal(answer["signal"], signal.SIG_DFL)
                os.kill(os.getpid(), answer["signal"])
            return int(answer["exit"])


def main(args: list[str]) -> int:
    try:
        opts = parse(args)
        mode = opts["mode"]
        if mode == "help":
            print(USAGE)
            return 0
        if mode == "version":
            print("Corral sudo (through the sandbox's guest agent)")
            return 0
        if mode == "noop" and not opts["command"]:
            return 0
        if mode == "list":
            print(f"User {pwd.getpwuid(os.getuid()).pw_name} may run the following commands:")
            print("    (ALL : ALL) NOPASSWD: ALL")
            return 0
        return run(request(opts))
    except Refused as exc:
        text = str(exc)
        print(text if text.startswith("usage:") else f"sudo: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

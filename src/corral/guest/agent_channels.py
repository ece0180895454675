"""What every call to the guest agent shares: the channel it opens and the refusal that
answers it with an error. Part of the agent: standard library only, Python 3.9 syntax."""

from __future__ import annotations

import errno
import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as signal
    from typing import Any

    from corral.guest.agent import Agent

    Args = dict[str, Any]
else:
    # Re-exported to the other agent modules, which import `signal` from here.
    try:
        import _signal as signal  # the C module: `signal` itself imports enum (~4 ms)
    except ImportError:
        import signal  # noqa: F401

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT

_ERRNO_TYPES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EFBIG: "no_space",
    errno.ENAMETOOLONG: "invalid_argument",
    errno.ELOOP: "invalid_argument",
    errno.EINVAL: "invalid_argument",
    errno.EBUSY: "invalid_argument",
    errno.ENXIO: "invalid_argument",  # a FIFO nobody reads, a socket: see open_regular
}
# Errors whose kind alone would not tell the caller what to do instead.
_ERRNO_HINTS = {
    errno.EBUSY: "{path} is a mount point or in use by the sandbox; it cannot be removed "
    "or replaced",
}
_HINTS = {
    "not_found": "{path} does not exist in the sandbox; check the path",
    "exists": "{path} already exists in the sandbox; remove it first or pick another path",
    "not_a_directory": "a component of {path} is not a directory; check the path",
    "is_a_directory": "{path} is a directory; this needs a file",
    "permission_denied": "the sandbox user may not do this to {path} ({reason})",
    "not_empty": "directory {path} is not empty; remove it with recursive=True",
    "no_space": "no space left writing {path}; raise the sandbox's disk limit or delete files",
}


def guest_module(name: str) -> Any:
    """The agent's module `name` (e.g. "agent_files"), imported at its first use.

    In a sandbox, beside this file: its bootstrap marks the package `corral` missing
    (`corral.isolation.agent_install.agent_command`), so the import of
    ``corral.guest.<name>`` fails at once instead of searching every path first."""
    try:
        return __import__(f"corral.guest.{name}", fromlist=["_"])
    except ImportError:  # run in a sandbox, beside this file
        return __import__(name)


class Refusal(Exception):
    """A CALL the agent answers with an error REPLY of this type."""

    def __init__(self, kind: str, message: str, unknown_op: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.unknown_op = unknown_op  # the op named in the CALL, when the agent has none


def refusal_from_os_error(exc: OSError) -> Refusal:
    kind = _ERRNO_TYPES.get(exc.errno or 0, "internal")
    path = exc.filename if exc.filename is not None else "the path"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = _ERRNO_HINTS.get(exc.errno or 0) or _HINTS.get(kind, "{path}: {reason}")
    return Refusal(kind, hint.format(path=path, reason=reason))


class Channel:
    """What one open channel carries; the defaults ignore what it does not expect."""

    def __init__(self, agent: Agent, channel: int) -> None:
        self.agent = agent
        self.channel = channel

    def on_in(self, data: bytes) -> None:
        self.agent.grant(self.channel, len(data))

    def on_eof(self) -> None:
        pass

    def on_credit(self, amount: int) -> None:
        pass

    def on_close(self) -> None:
        pass

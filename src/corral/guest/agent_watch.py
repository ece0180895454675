"""The guest agent's ``watch``: a directory's changes, from inotify, as EVENT frames.

Events carry E2B's (fsnotify's) kinds: ``create`` (created or moved in), ``write``,
``remove``, ``rename`` (moved away) and ``chmod`` (any attribute), and a name relative
to the watched directory. A recursive watch adds every subdirectory, and each one
created or moved in later. The kernel merges identical consecutive events nobody has
read yet (many writes make one), which is what makes a fresh upload the three events
E2B's clients count on: create, chmod, write.

The agent reads every watch before it answers any call (`drain_all`), so a caller that
asks for events after a change it made (an upload, a command that ended) finds them.
"""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from corral.guest.agent import Agent
    from corral.guest.agent_channels import Args

try:
    from corral.guest import protocol
    from corral.guest.agent_channels import EPOLLIN, Channel, Refusal
    from corral.guest.agent_files import entry_of
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import EPOLLIN, Channel, Refusal  # type: ignore[no-redef,import-not-found]
    from agent_files import entry_of  # type: ignore[no-redef,import-not-found]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF
)  # fmt: skip
# inotify's bits, in the order fsnotify tests them, and the kind each one reports.
KINDS = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
    (IN_MODIFY, "write"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "rename"),
    (IN_ATTRIB, "chmod"),
)
MAX_WATCHES = 8192  # directories one recursive watch may follow
_event_header = struct.Struct("iIII")

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def os_error(path: str) -> OSError:
    import ctypes

    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path)


class Watch(Channel):
    """One ``watch``: an inotify instance, its watched directories and what it sends."""

    def __init__(self, agent: Agent, channel: int, top: str, recursive: bool, entries: bool):
        super().__init__(agent, channel)
        self.top = top
        self.recursive = recursive
        self.entries = entries
        self.ids = agent.acting
        self.prefixes: dict[int, str] = {}  # watch descriptor -> directory relative to top
        self.fd = libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise os_error(top)
        try:
            self.add(top, "", IN_ONLYDIR)
            if recursive:
                self.add_tree(top, "")
        except BaseException:
            os.close(self.fd)
            raise

    def add(self, path: str, prefix: str, extra: int = 0) -> None:
        if len(self.prefixes) >= MAX_WATCHES:
            raise Refusal(
                "invalid_argument",
                f"{self.top} has more than {MAX_WATCHES} directories to watch; watch a "
                "subdirectory, or without recursive",
            )
        wd = libc().inotify_add_watch(self.fd, os.fsencode(path), MASK | extra)
        if wd < 0:
            raise os_error(path)
        self.prefixes[wd] = prefix

    def add_tree(self, path: str, prefix: str) -> None:
        """Watch every directory under `path` (already watched itself)."""
        pending = [(path, prefix)]
        while pending:
            directory, relative = pending.pop()
            try:
                with os.scandir(directory) as scan:
                    found = [e for e in scan if e.is_dir(follow_symlinks=False)]
            except OSError:  # gone already, or not readable: nothing to follow there
                continue
            for item in found:
                name = relative + item.name
                try:
                    self.add(item.path, name + "/")
                except OSError:
                    continue
                pending.append((item.path, name + "/"))

    def start(self) -> None:
        self.agent.watch(self.fd, EPOLLIN, self.on_readable)
        self.agent.watches.append(self)
        self.agent.send_json(protocol.EVENT, self.channel, {"events": []})

    def on_readable(self, fd: int, events: int) -> None:
        self.drain()

    def drain(self) -> None:
        """Read what inotify has and send it, as the user the watch was made by."""
        self.agent.as_user(self.ids, self.read_events)

    def read_events(self) -> None:
        found: list[Args] = []
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, size = _event_header.unpack_from(data, offset)
                offset += _event_header.size
                name = data[offset : offset + size].rstrip(b"\0").decode("utf-8", "replace")
                offset += size
                self.event(found, wd, mask, name)
        if found:
            self.agent.send_json(protocol.EVENT, self.channel, {"events": found})

    def event(self, found: list[Args], wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            found.append({"name": "", "type": "overflow"})
            return
        prefix = self.prefixes.get(wd)
        if prefix is None:
            return
        if mask & IN_IGNORED:
            del self.prefixes[wd]
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and prefix:
            return  # a subdirectory: its parent's watch reported it already
        relative = prefix + name if name else prefix.rstrip("/")
        path = os.path.join(self.top, relative) if relative else self.top
        if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            try:
                self.add(path, relative + "/")
                self.add_tree(path, relative + "/")
            except (OSError, Refusal):
                pass  # gone already, or too many: its events are missed, not the others'
        for bits, kind in KINDS:
            if mask & bits:
                event: Args = {"name": relative, "type": kind}
                if self.entries and kind not in ("remove", "rename"):
                    try:  # noqa: SIM105 (contextlib would slow the agent's start)
                        event["entry"] = entry_of(path)
                    except OSError:  # gone already
                        pass
                found.append(event)

    def on_close(self) -> None:
        if self.fd >= 0:
            self.agent.unwatch(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self in self.agent.watches:
            self.agent.watches.remove(self)


def drain_all(agent: Agent) -> None:
    for watch in list(agent.watches):
        watch.drain()


def op_watch(agent: Agent, channel: int, args: Args) -> None:
    top = agent.path(args)
    watch = Watch(agent, channel, top, bool(args.get("recursive")), bool(args.get("entries")))
    agent.channels[channel] = watch
    watch.start()

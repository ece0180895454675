"""The guest agent's file calls: read, write, list, stat, mkdir and remove.

File operations never block the agent's loop: files are opened with ``O_NONBLOCK`` (a
FIFO opens, or fails, at once) and anything but a regular file is refused. Reads and
writes stream in chunks as the host's credit allows.
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
    from corral.guest.agent_channels import Channel, Refusal, refusal_from_os_error
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import Channel, Refusal, refusal_from_os_error  # type: ignore[no-redef,import-not-found]

LIST_BATCH = 1000
LIST_MAX_ENTRIES = 100_000


def open_regular(path: str, flags: int, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open a regular file for the file ops, never blocking the agent's loop.

    A FIFO's open blocks until the other end opens it, and its reads and writes block or
    never end, as do a device's (/dev/zero): O_NONBLOCK makes the open return (or fail
    with ENXIO) at once, and fstat on what was opened refuses all but regular files.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, a socket: name what it is
            raise not_regular(path, os.stat(path).st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Refusal("is_a_directory", f"{path} is a directory; this needs a file (list it)")
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def not_regular(path: str, mode: int) -> Refusal:
    return Refusal(
        "invalid_argument",
        f"{path} is {special_kind(mode)}: file operations read and write regular files only "
        "(reading or writing it could block forever); use a command for it",
    )


def special_kind(mode: int) -> str:
    """What a file that is neither a regular file, a directory nor a symlink is."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def entry_of(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """The JSON entry of one file, with lstat semantics.

    Besides what lstat says: the owner's and group's names, the file's `metadata` (its
    ``user.e2b.*`` extended attributes, E2B's convention) when it has any, and for a
    symlink its raw target, the absolute path it resolves to and that path's type.
    """
    if st is None:
        st = os.lstat(path)
    mode = st.st_mode
    kind = kind_of(mode)
    entry = {
        "name": os.path.basename(path) or path,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
        "owner": user_name(st.st_uid),
        "group": group_name(st.st_gid),
    }
    if kind == "symlink":
        entry["symlink_target"] = os.readlink(path)
        resolved = os.path.realpath(path)
        entry["resolved"] = resolved
        try:
            entry["resolved_type"] = kind_of(os.stat(resolved).st_mode)
        except OSError:  # a dangling link
            entry["resolved_type"] = None
    elif kind in ("file", "dir"):
        metadata = read_metadata(path)
        if metadata:
            entry["metadata"] = metadata
    return entry


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


_user_names: dict[int, str] = {}
_group_names: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The sandbox's name for a uid (its /etc/passwd), or the number."""
    name = _user_names.get(uid)
    if name is None:
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _user_names[uid] = name
    return name


def group_name(gid: int) -> str:
    name = _group_names.get(gid)
    if name is None:
        import grp

        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        _group_names[gid] = name
    return name


# A file's metadata: its extended attributes in this namespace, the prefix left out.
METADATA_PREFIX = "user.e2b."
METADATA_MAX_BYTES = 4096  # all names (with the prefix) and values: one inode's budget


def read_metadata(target: str | int) -> dict[str, str]:
    """The metadata of a path or an open file; {} when it has none or may not be read."""
    try:
        names = [n for n in os.listxattr(target) if n.startswith(METADATA_PREFIX)]
        return {
            n[len(METADATA_PREFIX) :]: os.getxattr(target, n).decode("utf-8", "replace")
            for n in names
        }
    except OSError:  # no xattr support, or not readable by the acting user
        return {}


def replace_metadata(fd: int, metadata: dict[str, str], path: str) -> None:
    """Make `metadata` the open file's whole metadata (an empty dict clears it)."""
    for name in os.listxattr(fd):
        if name.startswith(METADATA_PREFIX) and name[len(METADATA_PREFIX) :] not in metadata:
            os.removexattr(fd, name)
    for key, value in metadata.items():
        try:
            os.setxattr(fd, METADATA_PREFIX + key, value.encode())
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise Refusal(
                    "unsupported",
                    f"{path} is on a file system without user extended attributes, so it "
                    "cannot carry metadata; write it elsewhere (/tmp, the home directory) "
                    "or without metadata",
                ) from None
            raise


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise Refusal("invalid_argument", "metadata must be an object of strings")
    size = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise Refusal("invalid_argument", "metadata keys and values must be strings")
        if not all(" " < c <= "~" for c in key) or not all(" " <= c <= "~" for c in value):
            raise Refusal(
                "invalid_argument",
                f"metadata {key!r} must be printable ASCII (keys without spaces)",
            )
        size += len(METADATA_PREFIX) + len(key) + len(value)
    if size > METADATA_MAX_BYTES:
        raise Refusal(
            "invalid_argument",
            f"metadata takes {size} bytes; at most {METADATA_MAX_BYTES} fit on one file",
        )
    return metadata


def remove_tree(top: str) -> None:
    """Remove a directory and everything under it, never following a symlink."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


class FileDownload(Channel):
    """A ``read``: file content to the host in OUT chunks, as fast as its credit allows."""

    def __init__(self, agent: Agent, channel: int, fd: int, offset: int, length: int | None):
        super().__init__(agent, channel)
        self.fd = fd
        self.position = offset
        self.remaining = length
        self.credit = protocol.WINDOW
        self.sent = 0

    @property
    def ready(self) -> bool:
        return self.credit > 0

    def pump(self) -> None:
        size = min(protocol.CHUNK, self.credit)
        if self.remaining is not None:
            size = min(size, self.remaining)
        try:
            data = os.pread(self.fd, size, self.position) if size else b""
        except OSError as exc:
            self.on_close()
            self.agent.reply_error(self.channel, refusal_from_os_error(exc))
            return
        if not data:
            self.on_close()
            self.agent.reply(self.channel, {"ok": True, "bytes": self.sent})
            return
        self.agent.send(protocol.OUT, self.channel, data)
        self.position += len(data)
        self.sent += len(data)
        self.credit -= len(data)
        if self.remaining is not None:
            self.remaining -= len(data)

    def on_credit(self, amount: int) -> None:
        self.credit += amount

    def on_close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.agent.downloads.remove(self)


class FileUpload(Channel):
    """A ``write``: IN chunks to a temporary file, renamed into place on EOF.

    With ``in_place`` the file itself is truncated and written, as E2B's envd does: a
    watcher sees its events (create, chmod, write) rather than a temporary file's, and
    a failed upload leaves what was written. ``metadata`` (when not None) replaces the
    file's metadata. The whole upload acts as the user the call named (`Agent.as_user`).
    """

    def __init__(
        self,
        agent: Agent,
        channel: int,
        path: str,
        mode: int,
        append: bool,
        in_place: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(agent, channel)
        self.path = path
        self.mode = mode
        self.metadata = metadata
        self.ids = agent.acting
        self.written = 0
        self.temp: str | None = None
        if append:
            self.fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)[0]
        elif in_place:
            try:  # a new file gets `mode` (whatever the umask); an existing one keeps its own
                self.fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)[0]
                created = True
            except FileExistsError:
                self.fd = open_regular(path, os.O_WRONLY | os.O_TRUNC)[0]
                created = False
            self.finish_attributes(chmod=created)  # now, as envd: before the data
        else:
            directory, name = os.path.split(path)
            self.temp = os.path.join(directory, f".{name}.corral-{os.getpid()}-{channel}.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                self.fd = os.open(self.temp, flags, 0o600)
            except OSError as exc:
                exc.filename = path
                raise

    def finish_attributes(self, chmod: bool = True) -> None:
        try:
            if chmod:
                os.fchmod(self.fd, self.mode)
            if self.metadata is not None:
                replace_metadata(self.fd, self.metadata, self.path)
        except BaseException:
            self.on_close()
            raise

    def on_in(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            exc.filename = self.path
            self.fail(refusal_from_os_error(exc))
            return
        self.written += len(data)
        self.agent.grant(self.channel, len(data))

    def on_eof(self) -> None:
        self.agent.as_user(self.ids, self.finish)

    def finish(self) -> None:
        try:
            if self.temp is not None:
                self.finish_attributes()
            os.close(self.fd)
            self.fd = -1
            if self.temp is not None:
                os.replace(self.temp, self.path)
                self.temp = None
            entry = entry_of(self.path)
        except Refusal as refusal:
            self.fail(refusal)
            return
        except OSError as exc:
            exc.filename, exc.filename2 = self.path, None
            self.fail(refusal_from_os_error(exc))
            return
        self.agent.reply(self.channel, {"ok": True, "bytes": self.written, "entry": entry})

    def fail(self, refusal: Refusal) -> None:
        self.on_close()
        self.agent.reply_error(self.channel, refusal)

    def on_close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.unlink(self.temp)
            except OSError:
                pass
            self.temp = None


def op_read(agent: Agent, channel: int, args: Args) -> None:
    path = agent.path(args)
    offset = args.get("offset") or 0
    length = args.get("length")
    if not isinstance(offset, int) or offset < 0:
        raise Refusal("invalid_argument", "offset must be a non-negative integer")
    if length is not None and (not isinstance(length, int) or length < 0):
        raise Refusal("invalid_argument", "length must be a non-negative integer or null")
    fd, st = open_regular(path, os.O_RDONLY)
    info = {"size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}
    agent.send_json(protocol.EVENT, channel, info)
    download = FileDownload(agent, channel, fd, offset, length)
    agent.channels[channel] = download
    agent.downloads.append(download)


def op_write(agent: Agent, channel: int, args: Args) -> None:
    path = agent.path(args)
    mode = args.get("mode", 0o644)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise Refusal("invalid_argument", f"mode must be an integer 0..0o7777, not {mode!r}")
    metadata = check_metadata(args.get("metadata"))
    if args.get("make_parents", True):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(path):
        raise Refusal("is_a_directory", f"{path} is a directory; write to a file path")
    append, in_place = bool(args.get("append")), bool(args.get("in_place"))
    upload = FileUpload(agent, channel, path, mode, append, in_place, metadata)
    agent.channels[channel] = upload


def op_list(agent: Agent, channel: int, args: Args) -> None:
    top = agent.path(args)
    depth = args.get("depth", 1)
    if not isinstance(depth, int) or depth < 1:
        raise Refusal("invalid_argument", f"depth must be an integer >= 1, not {depth!r}")
    entries: list[Args] = []
    count = 0
    pending = [(top, depth)]  # breadth first; each directory sorted by name
    for directory, levels in pending:
        try:
            with os.scandir(directory) as scan:
                found = sorted(scan, key=lambda item: item.name)
        except OSError:
            if directory == top:
                raise
            continue  # a subdirectory we may not read: its entry is listed, not its content
        for item in found:
            try:
                st = item.stat(follow_symlinks=False)
                entries.append(entry_of(os.path.join(directory, item.name), st))
            except FileNotFoundError:  # removed while we looked
                continue
            if levels > 1 and stat.S_ISDIR(st.st_mode):
                pending.append((item.path, levels - 1))
        count += len(found)
        if count > LIST_MAX_ENTRIES:
            raise Refusal(
                "invalid_argument",
                f"{top} holds more than {LIST_MAX_ENTRIES} entries at depth {depth}; "
                "list a smaller depth or a subdirectory",
            )
        while len(entries) >= LIST_BATCH:
            agent.send_json(protocol.EVENT, channel, {"entries": entries[:LIST_BATCH]})
            del entries[:LIST_BATCH]
    agent.reply(channel, {"ok": True, "entries": entries})


def op_stat(agent: Agent, channel: int, args: Args) -> None:
    agent.reply(channel, {"ok": True, "entry": entry_of(agent.path(args))})


def op_mkdir(agent: Agent, channel: int, args: Args) -> None:
    path = agent.path(args)
    try:
        os.makedirs(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise Refusal("exists", f"{path} exists and is not a directory") from None
        agent.reply(channel, {"ok": True, "created": False})
        return
    agent.reply(channel, {"ok": True, "created": True})


def op_remove(agent: Agent, channel: int, args: Args) -> None:
    path = agent.path(args)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        if args.get("recursive"):
            remove_tree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    agent.reply(channel, {"ok": True})

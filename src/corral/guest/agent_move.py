"""The guest agent's rename: rename(2), or a copy made a slice at a time across mounts."""

from __future__ import annotations

import errno
import os
import stat
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.guest.agent import Agent
    from corral.guest.agent_channels import Args

try:
    from corral.guest.agent_channels import Channel, Refusal, refusal_from_os_error
    from corral.guest.agent_files import entry_of, open_regular, remove_tree, special_kind
except ImportError:  # run in a sandbox, beside this file
    from agent_channels import Channel, Refusal, refusal_from_os_error  # type: ignore[no-redef,import-not-found]
    from agent_files import entry_of, open_regular, remove_tree, special_kind  # type: ignore[no-redef,import-not-found]

MOVE_SLICE = 0.005  # seconds of copying per turn of the loop: other calls go on meanwhile
MOVE_CHUNK = 1 << 20


class Move(Channel):
    """A ``rename`` across mounts (/workspace, /tmp, the home): copy, then remove, as mv.

    rename(2) cannot cross mounts (EXDEV). The copy goes to a hidden sibling of `dst`,
    MOVE_SLICE of work per turn of the loop, so a big tree never stalls other calls; one
    rename(2) then puts it in place with rename's own rules (a file replaces a file, a
    directory an empty directory), and only then is the source removed. A failure (no
    space, say) discards the copy and leaves the source as it was. Symlinks stay
    symlinks, modes and times are kept; hard links within the tree become separate files.
    """

    def __init__(self, agent: Agent, channel: int, src: str, dst: str, overwrite: bool):
        super().__init__(agent, channel)
        self.src = src
        self.dst = dst
        self.overwrite = overwrite
        self.ids = agent.acting  # each slice of the copy acts as the user the call named
        top = os.lstat(src)
        self.device = top.st_dev
        self.src_is_dir = stat.S_ISDIR(top.st_mode)
        if not os.access(os.path.dirname(src) or "/", os.W_OK):
            # Checked before copying: otherwise the copy would be made, and the source stay.
            raise Refusal(
                "permission_denied",
                f"{src} cannot be moved: the sandbox user may not remove it from its directory",
            )
        self.refuse_replacing(dst)
        directory, name = os.path.split(dst)
        self.temp: str | None = os.path.join(
            directory, f".{name}.corral-{os.getpid()}-{channel}.tmp"
        )
        self.pending = [(src, self.temp)]  # entries still to copy, depth first
        # Directories copied, parents first: (the copy, the source, the source's stat).
        self.dirs: list[tuple[str, str, os.stat_result]] = []
        self.current = self.temp  # the copy being made, named in errors
        self.reader = -1
        self.writer = -1
        self.file_stat: os.stat_result | None = None

    def refuse_replacing(self, dst: str) -> None:
        """Fail early, before any copying, as the final rename(2) would fail late."""
        try:
            target = os.lstat(dst)
        except FileNotFoundError:
            return
        if self.src_is_dir and not stat.S_ISDIR(target.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), dst)
        if stat.S_ISDIR(target.st_mode):
            if not self.src_is_dir:
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), dst)
            if os.listdir(dst):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), dst)

    def pump(self) -> None:
        """Copy for one slice of time; finish when all is copied; fail on an error."""
        deadline = time.monotonic() + MOVE_SLICE
        try:
            while time.monotonic() < deadline:
                if self.writer >= 0:
                    self.copy_chunk()
                elif self.pending:
                    self.copy_entry(*self.pending.pop())
                else:
                    self.finish()
                    return
        except Refusal as refusal:
            self.fail(refusal)
        except OSError as exc:
            if exc.filename is None:  # a read or write: the file being copied
                exc.filename = self.current
            temp = self.temp
            if temp and isinstance(exc.filename, str) and exc.filename.startswith(temp):
                exc.filename = self.dst + exc.filename[len(temp) :]  # name no hidden copy
            exc.filename2 = None
            self.fail(refusal_from_os_error(exc))

    def copy_entry(self, src: str, dst: str) -> None:
        self.current = dst
        st = os.lstat(src)
        mode = st.st_mode
        if st.st_dev != self.device:  # a mount point inside the tree: it cannot be removed
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src)
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)  # its own mode once its content is in
            self.dirs.append((dst, src, st))
            with os.scandir(src) as entries:
                self.pending.extend((e.path, os.path.join(dst, e.name)) for e in entries)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISREG(mode):
            self.reader = open_regular(src, os.O_RDONLY | os.O_NOFOLLOW)[0]
            self.writer = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.file_stat = st
        else:
            raise Refusal(
                "unsupported",
                f"{src} is {special_kind(mode)}: moving one across mounts is not supported; "
                "move it within its mount, or create it anew where it should be",
            )

    def copy_chunk(self) -> None:
        data = os.read(self.reader, MOVE_CHUNK)
        view = memoryview(data)
        while view:
            view = view[os.write(self.writer, view) :]
        if data:
            return
        st = self.file_stat
        assert st is not None
        os.fchmod(self.writer, stat.S_IMODE(st.st_mode))
        os.utime(self.writer, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.close_files()

    def finish(self) -> None:
        temp = self.temp
        assert temp is not None
        self.current = temp
        for path, _src, st in reversed(self.dirs):  # children first: a parent may be read-only
            os.chmod(path, stat.S_IMODE(st.st_mode))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if not self.overwrite and os.path.lexists(self.dst):  # created while we copied
            raise Refusal("exists", f"{self.dst} already exists; pass overwrite=True to replace it")
        os.rename(temp, self.dst)
        self.temp = None
        self.agent.moves.remove(self)
        try:
            if self.src_is_dir:
                for _copy, path, st in self.dirs:  # a read-only directory is moved all the same
                    if st.st_mode & 0o700 != 0o700:
                        os.chmod(path, 0o700)
                remove_tree(self.src)
            else:
                os.unlink(self.src)
        except OSError as exc:
            refusal = refusal_from_os_error(exc)
            message = f"{self.src} was copied to {self.dst} but not all removed: {refusal}"
            self.agent.reply_error(self.channel, Refusal(refusal.kind, message))
            return
        self.agent.reply(self.channel, {"ok": True, "entry": entry_of(self.dst)})

    def fail(self, refusal: Refusal) -> None:
        self.on_close()
        self.agent.reply_error(self.channel, refusal)

    def close_files(self) -> None:
        for fd in (self.reader, self.writer):
            if fd >= 0:
                os.close(fd)
        self.reader = self.writer = -1

    def on_close(self) -> None:
        """Failed, or the host stopped waiting: discard the copy, keep the source."""
        self.close_files()
        if self in self.agent.moves:
            self.agent.moves.remove(self)
        temp, self.temp = self.temp, None
        if temp is None:
            return
        for path, _src, _st in self.dirs:  # a copied mode may forbid removing what is inside
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.chmod(path, 0o700)
            except OSError:
                pass
        try:
            if stat.S_ISDIR(os.lstat(temp).st_mode):
                remove_tree(temp)
            else:
                os.unlink(temp)
        except OSError:
            pass


def op_rename(agent: Agent, channel: int, args: Args) -> None:
    src, dst = agent.path(args, "src"), agent.path(args, "dst")
    overwrite = bool(args.get("overwrite", True))
    if not overwrite and os.path.lexists(dst):
        raise Refusal("exists", f"{dst} already exists; pass overwrite=True to replace it")
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        move = Move(agent, channel, src, dst, overwrite)  # replies when it is done
        agent.channels[channel] = move
        agent.moves.append(move)
        return
    agent.reply(channel, {"ok": True, "entry": entry_of(dst)})

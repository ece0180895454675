"""Files in teams' live sandboxes: read and write (streamed), list, stat, mkdir, rm, mv.

Paths are resolved by the guest agent inside the sandbox (relative ones from /workspace),
so `..` cannot leave it. Each chunk read or written counts as activity for the
sandbox's idle timer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING

from corral import tracing
from corral.guest import EntryInfo, GuestWatch

if TYPE_CHECKING:
    from corral.sandboxes.manager import SandboxManager
    from corral.store import Team


class SandboxFiles:
    """The files of a manager's live sandboxes: `SandboxManager.files`."""

    def __init__(self, manager: SandboxManager) -> None:
        self._manager = manager

    # Each call acts as `user` (None: the template's default) and, with `home`, resolves
    # relative paths from that user's home directory (E2B's rule) instead of /workspace.

    async def read_file(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> AsyncGenerator[bytes]:
        """The file's bytes from `offset` (`length` of them; None: to its end), in chunks."""
        with tracing.lasting("sandbox.files.read", {tracing.SANDBOX_ID: sandbox_id}) as span:
            with tracing.within(span):
                box = await self._manager.running(team, sandbox_id)
            chunks = box.read_file(path, offset=offset, length=length, user=user, home=home)
            async for chunk in chunks:
                self._manager.touch(sandbox_id)
                yield chunk

    @tracing.traced("sandbox.files.write")
    async def write_file(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        data: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
        in_place: bool = False,
        metadata: Mapping[str, str] | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo:
        """Write a file; `in_place` and `metadata` as `GuestConnection.write_file`."""
        box = await self._manager.running(team, sandbox_id)

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in data:
                self._manager.touch(sandbox_id)
                yield chunk

        return await box.write_file(
            path,
            counted(),
            mode=mode,
            append=append,
            in_place=in_place,
            metadata=metadata,
            user=user,
            home=home,
        )

    @tracing.traced("sandbox.files.list")
    async def list_dir(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        *,
        depth: int = 1,
        user: str | None = None,
        home: bool = False,
    ) -> list[EntryInfo]:
        box = await self._manager.running(team, sandbox_id)
        return await box.list_dir(path, depth=depth, user=user, home=home)

    @tracing.traced("sandbox.files.stat")
    async def stat(
        self, team: Team, sandbox_id: str, path: str, *, user: str | None = None, home: bool = False
    ) -> EntryInfo:
        box = await self._manager.running(team, sandbox_id)
        return await box.stat(path, user=user, home=home)

    @tracing.traced("sandbox.files.make_dir")
    async def make_dir(
        self, team: Team, sandbox_id: str, path: str, *, user: str | None = None, home: bool = False
    ) -> bool:
        """Create the directory and its parents; False if it existed."""
        box = await self._manager.running(team, sandbox_id)
        return await box.make_dir(path, user=user, home=home)

    @tracing.traced("sandbox.files.remove")
    async def remove(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        *,
        recursive: bool = False,
        user: str | None = None,
        home: bool = False,
    ) -> None:
        box = await self._manager.running(team, sandbox_id)
        await box.remove(path, recursive=recursive, user=user, home=home)

    @tracing.traced("sandbox.files.move")
    async def move(
        self,
        team: Team,
        sandbox_id: str,
        source: str,
        destination: str,
        *,
        overwrite: bool = True,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo | None:
        box = await self._manager.running(team, sandbox_id)
        return await box.rename(source, destination, overwrite=overwrite, user=user, home=home)

    @tracing.traced("sandbox.files.watch")
    async def watch(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        *,
        recursive: bool = False,
        entries: bool = False,
        user: str | None = None,
        home: bool = False,
    ) -> GuestWatch:
        """Watch a directory's changes until the watch is closed (`GuestWatch.aclose`)."""
        box = await self._manager.running(team, sandbox_id)
        return await box.watch(path, recursive=recursive, entries=entries, user=user, home=home)

    @tracing.traced("sandbox.files.sync")
    async def sync(self, team: Team, sandbox_id: str) -> None:
        """Wait until watch events of every change made before now have arrived."""
        box = await self._manager.running(team, sandbox_id)
        await box.sync()

"""Files in teams' live sandboxes: read and write (streamed), list, stat, mkdir, rm, mv.

Paths are resolved by the guest agent inside the sandbox (relative ones from /workspace),
so `..` cannot leave it. Each chunk read or written counts as activity for the
sandbox's idle timer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

from corral.guest import EntryInfo

if TYPE_CHECKING:
    from corral.sandboxes.manager import SandboxManager
    from corral.store import Team


class SandboxFiles:
    """The files of a manager's live sandboxes: `SandboxManager.files`."""

    def __init__(self, manager: SandboxManager) -> None:
        self._manager = manager

    async def read_file(
        self, team: Team, sandbox_id: str, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes]:
        """The file's bytes from `offset` (`length` of them; None: to its end), in chunks."""
        box = await self._manager.running(team, sandbox_id)
        async for chunk in box.read_file(path, offset=offset, length=length):
            self._manager.touch(sandbox_id)
            yield chunk

    async def write_file(
        self,
        team: Team,
        sandbox_id: str,
        path: str,
        data: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
    ) -> EntryInfo:
        box = await self._manager.running(team, sandbox_id)

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in data:
                self._manager.touch(sandbox_id)
                yield chunk

        return await box.write_file(path, counted(), mode=mode, append=append)

    async def list_dir(
        self, team: Team, sandbox_id: str, path: str, *, depth: int = 1
    ) -> list[EntryInfo]:
        box = await self._manager.running(team, sandbox_id)
        return await box.list_dir(path, depth=depth)

    async def stat(self, team: Team, sandbox_id: str, path: str) -> EntryInfo:
        box = await self._manager.running(team, sandbox_id)
        return await box.stat(path)

    async def make_dir(self, team: Team, sandbox_id: str, path: str) -> bool:
        """Create the directory and its parents; False if it existed."""
        box = await self._manager.running(team, sandbox_id)
        return await box.make_dir(path)

    async def remove(
        self, team: Team, sandbox_id: str, path: str, *, recursive: bool = False
    ) -> None:
        box = await self._manager.running(team, sandbox_id)
        await box.remove(path, recursive=recursive)

    async def move(
        self, team: Team, sandbox_id: str, source: str, destination: str, *, overwrite: bool = True
    ) -> EntryInfo | None:
        box = await self._manager.running(team, sandbox_id)
        return await box.rename(source, destination, overwrite=overwrite)

"""Files in a sandbox (async). Relative paths start at /workspace; `..` cannot leave."""

from __future__ import annotations

from collections.abc import AsyncIterator

from corral.client._connection import Connection
from corral.client._models import EntryInfo
from corral.errors import FileNotFound
from corral.v1 import sandbox_pb2 as pb

# Each WriteFile message carries at most this much: well under the server's 8 MiB cap.
CHUNK = 1024 * 1024


class AsyncFiles:
    """`sandbox.files`: read, write, list and change files inside the sandbox."""

    def __init__(self, connection: Connection, sandbox_id: str) -> None:
        self._connection = connection
        self._sandbox_id = sandbox_id

    async def read_bytes(self, path: str) -> bytes:
        request = pb.ReadFileRequest(sandbox_id=self._sandbox_id, path=path)
        stream = self._connection.stream(self._connection.rpc.read_file, request)
        return b"".join([message.data async for message in stream])

    async def read(self, path: str) -> str:
        """The file's content as text (UTF-8; undecodable bytes become U+FFFD)."""
        return (await self.read_bytes(path)).decode(errors="replace")

    async def write(
        self, path: str, data: str | bytes, *, mode: int = 0o644, append: bool = False
    ) -> EntryInfo:
        """Write a file, creating its parent directories; it appears whole or not at all."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        header = pb.WriteFileHeader(
            sandbox_id=self._sandbox_id, path=path, mode=mode, append=append
        )

        async def messages() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            for start in range(0, len(raw), CHUNK):
                yield pb.WriteFileRequest(data=raw[start : start + CHUNK])

        reply = await self._connection.upload(self._connection.rpc.write_file, messages())
        return EntryInfo.from_proto(reply.entry)

    async def list(self, path: str = ".", *, depth: int = 1) -> list[EntryInfo]:
        request = pb.ListDirRequest(sandbox_id=self._sandbox_id, path=path, depth=depth)
        reply = await self._connection.call(self._connection.rpc.list_dir, request)
        return [EntryInfo.from_proto(e) for e in reply.entries]

    async def get_info(self, path: str) -> EntryInfo:
        request = pb.StatRequest(sandbox_id=self._sandbox_id, path=path)
        reply = await self._connection.call(self._connection.rpc.stat, request)
        return EntryInfo.from_proto(reply.entry)

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
        except FileNotFound:
            return False
        return True

    async def make_dir(self, path: str) -> bool:
        """Create a directory and its parents; False if it existed already."""
        request = pb.MakeDirRequest(sandbox_id=self._sandbox_id, path=path)
        return (await self._connection.call(self._connection.rpc.make_dir, request)).created

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        request = pb.RemoveRequest(sandbox_id=self._sandbox_id, path=path, recursive=recursive)
        await self._connection.call(self._connection.rpc.remove, request)

    async def rename(self, old_path: str, new_path: str, *, overwrite: bool = True) -> EntryInfo:
        request = pb.MoveRequest(
            sandbox_id=self._sandbox_id,
            source=old_path,
            destination=new_path,
            no_overwrite=not overwrite,
        )
        reply = await self._connection.call(self._connection.rpc.move, request)
        if reply.HasField("entry"):
            return EntryInfo.from_proto(reply.entry)
        return await self.get_info(new_path)

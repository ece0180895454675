"""Files in a sandbox (async). Relative paths start at /workspace; `..` cannot leave."""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Literal, Protocol, overload

from corral.client._connection import Connection
from corral.client._models import EntryInfo
from corral.errors import FileNotFound, InvalidRequest
from corral.v1 import sandbox_pb2 as pb

# Each WriteFile message carries at most this much: well under the server's 8 MiB cap.
CHUNK = 1024 * 1024

ReadFormat = Literal["text", "bytes", "stream"]


def check_format(format: object) -> None:
    if format not in ("text", "bytes", "stream"):
        raise InvalidRequest(f"format={format!r}: use 'text', 'bytes' or 'stream'")


class FileToWrite(Protocol):
    """A path and its data: `WriteEntry`, or E2B's own `WriteEntry`."""

    @property
    def path(self) -> str: ...

    @property
    def data(self) -> str | bytes: ...


class AsyncFiles:
    """`sandbox.files`: read, write, list and change files inside the sandbox."""

    def __init__(self, connection: Connection, sandbox_id: str) -> None:
        self._connection = connection
        self._sandbox_id = sandbox_id

    async def read_bytes(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_stream(path)])

    async def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's content in chunks, as it arrives (for files too big to hold)."""
        request = pb.ReadFileRequest(sandbox_id=self._sandbox_id, path=path)
        async for message in self._connection.stream(self._connection.rpc.read_file, request):
            yield message.data

    @overload
    async def read(self, path: str, format: Literal["text"] = "text") -> str: ...

    @overload
    async def read(self, path: str, format: Literal["bytes"]) -> bytes: ...

    @overload
    async def read(self, path: str, format: Literal["stream"]) -> AsyncGenerator[bytes, None]: ...

    async def read(
        self, path: str, format: ReadFormat = "text"
    ) -> str | bytes | AsyncGenerator[bytes, None]:
        """The file's content as text (UTF-8; undecodable bytes become U+FFFD).

        `format="bytes"` gives bytes and `format="stream"` an iterator of chunks, as in
        E2B's SDK (the same as `read_bytes` and `read_stream`).
        """
        check_format(format)
        if format == "bytes":
            return await self.read_bytes(path)
        if format == "stream":
            return self.read_stream(path)
        return (await self.read_bytes(path)).decode(errors="replace")

    @overload
    async def write(
        self, path: str, data: str | bytes, *, mode: int = 0o644, append: bool = False
    ) -> EntryInfo: ...

    @overload
    async def write(
        self, path: Sequence[FileToWrite], *, mode: int = 0o644, append: bool = False
    ) -> builtins.list[EntryInfo]: ...

    async def write(
        self,
        path: str | Sequence[FileToWrite],
        data: str | bytes | None = None,
        *,
        mode: int = 0o644,
        append: bool = False,
    ) -> EntryInfo | builtins.list[EntryInfo]:
        """Write a file, creating its parent directories; it appears whole or not at all.

        `write([WriteEntry(path, data), ...])` writes several, one after the other, as in
        E2B's SDK.
        """
        if isinstance(path, str):
            if data is None:
                raise InvalidRequest(f"write({path!r}) needs the data to write")
            return await self._write_one(path, data, mode, append)
        if data is not None:
            raise InvalidRequest(
                "write(entries) takes the data in each entry: write([WriteEntry(path, data)])"
            )
        for entry in path:
            if not isinstance(getattr(entry, "path", None), str) or not isinstance(
                getattr(entry, "data", None), str | bytes
            ):
                raise InvalidRequest(
                    f"write(entries): {entry!r} is no entry; use WriteEntry(path, data)"
                )
        return [await self._write_one(e.path, e.data, mode, append) for e in path]

    async def _write_one(self, path: str, data: str | bytes, mode: int, append: bool) -> EntryInfo:
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

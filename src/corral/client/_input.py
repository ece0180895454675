"""A command's stdin fed from bytes, an iterable of chunks or an async iterable (`input=`).

A blocking iterable (the chunks of a pipe, say) is pulled on a daemon thread of its own:
a read that never returns, such as the stdin of a producer that writes nothing, then holds
neither the event loop nor the exit of the process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterable, Iterable

CHUNK = 64 * 1024
# Chunks read ahead of what the server has taken: a bound, so a fast producer waits.
_AHEAD = 4

Input = bytes | str | Iterable[bytes] | AsyncIterable[bytes]


class _Pump:
    """Chunks of a blocking iterable, read on a daemon thread into a bounded queue."""

    def __init__(self, source: Iterable[bytes]) -> None:
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_AHEAD)
        self._stopped = threading.Event()
        threading.Thread(target=self._pull, name="corral-stdin", daemon=True).start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        """Hand one item to the loop, waiting for room; False once nobody takes any more."""
        if self._stopped.is_set():
            return False
        try:
            asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result()
        except (RuntimeError, asyncio.CancelledError):  # the loop is gone
            return False
        return not self._stopped.is_set()

    def _pull(self) -> None:
        try:
            for chunk in self._source:
                if not self._put(chunk):
                    return
        except Exception as exc:  # a failed read ends the input with its error
            self._put(exc)
            return
        self._put(None)

    async def next(self) -> bytes | None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading: take what is queued so a waiting put returns and the thread ends."""
        self._stopped.set()
        while not self._queue.empty():
            self._queue.get_nowait()


async def chunks(source: Input) -> AsyncGenerator[bytes]:
    """The chunks of `source`, in order; the caller must close this generator."""
    if isinstance(source, str):
        source = source.encode()
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
        for start in range(0, len(raw), CHUNK):
            yield raw[start : start + CHUNK]
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        pump = _Pump(source)
        try:
            while (item := await pump.next()) is not None:
                yield item
        finally:
            pump.close()

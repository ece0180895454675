"""A socket whose other end is a connection the guest agent made inside a sandbox.

Where the host cannot enter a sandbox's network namespace (a server without root, and
tiers whose network is not the host kernel's), the port proxy still gets a plain socket:
one end of a socket pair, the other end relayed to a `GuestStream` by a task, until
either side ends. It costs a copy and the agent's framing: the namespace path is the
fast one (`corral.isolation.port_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from corral.guest import GuestStream

_CHUNK = 64 * 1024


async def bridge(stream: GuestStream) -> tuple[socket.socket, asyncio.Task[None]]:
    """A non-blocking socket for the caller and the task relaying it to `stream` (it
    ends, closing both, when the connection does)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
    except BaseException:
        ours.close()
        theirs.close()
        stream.close()
        raise

    async def up() -> None:  # the caller's bytes into the sandbox
        while data := await reader.read(_CHUNK):
            await stream.write(data)
        await stream.write_eof()

    async def down() -> None:  # the sandbox's bytes to the caller
        while data := await stream.read():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def relay() -> None:
        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            # Either direction failing (a reset) ends the connection; a clean end of one
            # waits for the other.
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            for task in tasks:
                task.cancel()
            stream.close()
            writer.close()

    return theirs, asyncio.create_task(relay())

"""The channel machinery under `GuestConnection`: many calls over one framed byte stream.

Every call opens a channel on the connection, so any number of commands, uploads and
downloads share one byte stream. Output reaches the caller with back-pressure: credit
goes back to the agent only as the caller consumes chunks, so a caller that stops
reading stops the command (it blocks on its own write) instead of filling memory. An
agent that sends beyond its credit, or piles up unread frames, is cut off.

The agent's error replies become `corral.errors` here, in `_error_for`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Any

from corral import tracing
from corral._aio import stop_tasks
from corral.errors import (
    CommandError,
    CorralError,
    DirectoryNotEmpty,
    FileExists,
    FileNotFound,
    GuestError,
    InvalidRequest,
    IsADirectory,
    IsolationUnavailable,
    NoSpace,
    NotADirectory,
    PermissionDenied,
    PortClosed,
    SandboxNotRunning,
    UnknownUser,
)
from corral.guest import protocol

# How long `aclose` waits for the agent's stream to end before giving up on it.
_CLOSE_GRACE = 1.0
# Unread EVENT/REPLY bytes one channel may hold before the agent is deemed broken.
_MAX_BACKLOG = 16 * 1024 * 1024
# Grant credit back in batches: one CREDIT frame per this many consumed bytes.
_CREDIT_BATCH = protocol.CHUNK


_ERRORS: dict[str, type[CorralError]] = {
    "not_found": FileNotFound,
    "exists": FileExists,
    "not_a_directory": NotADirectory,
    "is_a_directory": IsADirectory,
    "permission_denied": PermissionDenied,
    "not_empty": DirectoryNotEmpty,
    "no_space": NoSpace,
    "invalid_argument": InvalidRequest,
    "not_running": CommandError,
    "refused": PortClosed,
    "needs_root": IsolationUnavailable,
    "unknown_user": UnknownUser,
}


def _error_for(op: str, reply: Mapping[str, Any]) -> CorralError:
    """The one translation from the agent's error replies to Corral's errors."""
    error = reply.get("error")
    if not isinstance(error, dict):
        return GuestError(f"the guest agent answered {op} with a malformed error: {reply!r}")
    kind = error.get("type")
    message = str(error.get("message") or f"{op} failed ({kind})")
    if kind == "unsupported":
        if error.get("unknown_op") is not None:  # not the caller's doing: the versions differ
            return GuestError(f"{message}; the agent is older than this client")
        return InvalidRequest(message)  # a request this agent does not do: the caller's
    if op == "exec" and kind != "unknown_user":  # a bad cwd or environment: it could not start
        return CommandError(message)
    return _ERRORS.get(str(kind), GuestError)(message)


class ChannelEnded(Exception):
    """The agent closed the channel (its REPLY is in the inbox) while we were sending."""


class Channel:
    """One open call: its inbox of frames and both directions of credit."""

    def __init__(self, connection: Multiplexer, number: int) -> None:
        self.connection = connection
        self.number = number
        self.inbox: deque[tuple[int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.failure: CorralError | None = None
        self.open = True  # until the REPLY arrives or we CLOSE it
        self.send_credit = protocol.WINDOW
        self.credit_waiter: asyncio.Future[None] | None = None
        self.unacked = 0
        # OUT/ERR bytes the agent may still send: an agent that ignores its credit (a
        # hijacked one, say) is cut off instead of growing the host's memory.
        self.receive_allowance = protocol.WINDOW
        # Other frames not yet taken by the caller; bounded for the same reason.
        self.backlog = 0

    def deliver(self, kind: int, payload: bytes) -> None:
        if kind == protocol.CREDIT:
            self.send_credit += protocol.decode_credit(payload)
            _wake(self.credit_waiter)
            return
        if kind in (protocol.OUT, protocol.ERR):
            self.receive_allowance -= len(payload)
            if self.receive_allowance < 0:
                raise protocol.ProtocolError(f"channel {self.number}: output beyond its credit")
        else:
            self.backlog += len(payload) + protocol.HEADER_SIZE
            if self.backlog > _MAX_BACKLOG:
                raise protocol.ProtocolError(f"channel {self.number}: unread frames pile up")
        self.inbox.append((kind, payload))
        if kind == protocol.REPLY:
            self.open = False
            _wake(self.credit_waiter)
        _wake(self.waiter)

    def fail(self, failure: CorralError) -> None:
        """Nothing more will arrive: raise `failure` once the inbox is empty."""
        self.open = False
        if self.failure is None:
            self.failure = failure
        _wake(self.waiter)
        _wake(self.credit_waiter)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise type(self.failure)(str(self.failure))

    async def next(self) -> tuple[int, bytes]:
        while not self.inbox:
            self.raise_failure()
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        kind, payload = self.inbox.popleft()
        if kind not in (protocol.OUT, protocol.ERR):
            self.backlog -= len(payload) + protocol.HEADER_SIZE
        return kind, payload

    def take_nowait(self) -> tuple[int, bytes] | None:
        """The next frame if one is in the inbox (no waiting, no failure raised)."""
        if not self.inbox:
            return None
        kind, payload = self.inbox.popleft()
        if kind not in (protocol.OUT, protocol.ERR):
            self.backlog -= len(payload) + protocol.HEADER_SIZE
        return kind, payload

    async def reply(self, op: str) -> dict[str, Any]:
        """Wait for the REPLY (skipping anything else) and raise the error it carries."""
        while True:
            kind, payload = await self.next()
            if kind == protocol.REPLY:
                return self.connection._check_reply(op, payload)

    def consumed(self, amount: int) -> None:
        """The caller took `amount` bytes of OUT/ERR: let the agent send that much more."""
        self.unacked += amount
        if self.unacked >= _CREDIT_BATCH and self.open:
            self.connection._send_nowait(
                protocol.CREDIT, self.number, protocol.encode_credit(self.unacked)
            )
            self.receive_allowance += self.unacked
            self.unacked = 0

    async def take_credit(self, wanted: int) -> int:
        """Wait until the agent lets us send IN bytes; return how many (<= wanted)."""
        while self.open and self.send_credit <= 0:
            self.credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.credit_waiter
            finally:
                self.credit_waiter = None
        if not self.open:
            self.raise_failure()  # the connection died, or we detached
            raise ChannelEnded
        granted = min(wanted, self.send_credit)
        self.send_credit -= granted
        return granted

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = await self.take_credit(min(len(view), protocol.CHUNK))
            self.connection._send_nowait(protocol.IN, self.number, bytes(view[:size]))
            view = view[size:]
            await self.connection._drain()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Multiplexer:
    """Many calls over one byte stream to a guest agent (its stdin and stdout): framing,
    one `Channel` per call, and the end of all of them when the stream ends.

    `GuestConnection` adds the typed calls; this class knows no op but by name.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._channels: dict[int, Channel] = {}
        self._next_number = 1
        self._failure: CorralError | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def start(self) -> None:
        """Start reading the agent's frames."""
        self._task = asyncio.create_task(self._read_frames(), name="corral-guest-reader")

    async def aclose(self) -> None:
        """Close the stream (the agent exits) and fail every call still waiting."""
        self._fail(GuestError("the guest connection was closed"))
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            # The reader drains until the agent's stream ends (it exits on our EOF);
            # cancelling it earlier would leave the pipe paused and the process unreaped.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_GRACE)
            except TimeoutError:
                await stop_tasks(self._task)

    # -- frames -----------------------------------------------------------------------

    async def _read_frames(self) -> None:
        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(protocol.HEADER_SIZE)
                length, kind, number = protocol.unpack_header(header)
                size = protocol.check_header(length, kind)
                payload = await reader.readexactly(size) if size else b""
                if kind in (protocol.CALL, protocol.IN, protocol.EOF, protocol.CLOSE):
                    raise protocol.ProtocolError(f"the agent sent a {protocol.KIND_NAMES[kind]}")
                channel = self._channels.get(number)
                if channel is not None:  # else a channel we closed: drop what was in flight
                    channel.deliver(kind, payload)
                    if kind == protocol.REPLY:
                        del self._channels[number]
        except asyncio.IncompleteReadError:
            reason = "its output stream ended; the sandbox may be gone or out of memory"
        except (ConnectionError, OSError) as exc:
            reason = f"reading from it failed: {exc}"
        except protocol.ProtocolError as exc:
            reason = f"it broke the protocol: {exc}"
        self._fail(GuestError(f"the guest agent exited: {reason}"))
        # Keep reading (and discarding) to the end of the stream: an unread pipe would
        # block the agent and keep asyncio from ever reaping its process.
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(1 << 16):
                pass

    async def detach(self, message: str) -> None:
        """Before the sandbox is checkpointed: end every call here (`SandboxNotRunning`
        with `message`, as `abort`) and have the agent let go of them too (`detach`), so
        the connection made to it after a restore starts clean. The agent keeps running
        and so do its background commands; nothing more is sent on this connection."""
        self._fail(SandboxNotRunning(message))
        number = 0xFFFFFFFF  # no call is open any more: any number is free
        channel = self._channels[number] = Channel(self, number)
        payload = protocol.encode_json({"op": "detach"})
        self._writer.write(protocol.encode_header(protocol.CALL, number, len(payload)) + payload)
        try:
            await self._writer.drain()
            kind, reply = await channel.next()
        except (ConnectionError, OSError, CorralError) as exc:
            raise GuestError(f"the guest agent did not let go of its calls: {exc}") from None
        finally:
            self._channels.pop(number, None)
        if kind != protocol.REPLY:
            raise GuestError("the guest agent answered detach with a stream, not a reply")
        self._check_reply("detach", reply)

    def abort(self, message: str) -> None:
        """The host is ending the sandbox on purpose: the agent's death that follows is
        no fault. Calls in flight and later ones fail with `SandboxNotRunning` (a caller's
        error, not an internal one), and commands end with reason "killed"."""
        self._fail(SandboxNotRunning(message))

    def _fail(self, failure: CorralError) -> None:
        if self._failure is None:
            self._failure = failure
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.fail(failure)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))

    def _send_nowait(self, kind: int, number: int, payload: bytes = b"") -> None:
        self._check_open()
        self._writer.write(protocol.encode_header(kind, number, len(payload)) + payload)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._fail(GuestError(f"the guest agent exited: writing to it failed: {exc}"))
            self._check_open()

    def _check_reply(self, op: str, payload: bytes) -> dict[str, Any]:
        try:
            reply = protocol.decode_json(payload)
        except ValueError as exc:
            raise GuestError(f"the guest agent sent a malformed reply to {op}: {exc}") from None
        if not isinstance(reply, dict):
            raise GuestError(f"the guest agent sent a malformed reply to {op}: {reply!r}")
        if not reply.get("ok"):
            raise _error_for(op, reply)
        return reply

    async def _open_channel(self, op: str, args: Mapping[str, Any]) -> Channel:
        """Send a CALL on a new channel."""
        self._check_open()
        payload = protocol.encode_json({"op": op, **args})
        if len(payload) > protocol.MAX_PAYLOAD:
            raise InvalidRequest(f"the {op} request is {len(payload)} bytes; the limit is 1 MiB")
        number = self._next_number
        while number in self._channels or number == 0:
            number = (number + 1) & 0xFFFFFFFF
        self._next_number = (number + 1) & 0xFFFFFFFF
        channel = Channel(self, number)
        self._channels[number] = channel
        self._send_nowait(protocol.CALL, number, payload)
        await self._drain()
        return channel

    def _close_channel(self, channel: Channel, failure: CorralError) -> None:
        """Stop listening on a channel (CLOSE); later reads from it raise `failure`."""
        if channel.open and self._failure is None:
            self._channels.pop(channel.number, None)
            self._send_nowait(protocol.CLOSE, channel.number)
        channel.fail(failure)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One CALL and its REPLY; the raw form of every typed call."""
        with tracing.span(f"agent.{op}"):  # the host's side of the call: its round trip
            channel = await self._open_channel(op, args)
            return await channel.reply(op)

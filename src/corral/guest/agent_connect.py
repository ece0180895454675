"""The guest agent's `connect` call: a TCP connection to 127.0.0.1:PORT (else ::1:PORT)
inside the sandbox, its bytes relayed over the channel (OUT what the peer sends, IN what
it is sent).

The port proxy's path into a sandbox the host cannot enter: a server without the
privilege to join the sandbox's network namespace, and tiers whose network is not the
host kernel's (gVisor, microVMs). Flow control is the channel's: the peer is read only
while the host has granted credit, and IN is granted back as the socket takes it.
Uses the `_socket` C module, imported at the first call (not on the agent's start):
`socket` imports `enum`, which the agent avoids.
"""

from __future__ import annotations

import errno

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

    from corral.guest.agent import Agent
    from corral.guest.agent_channels import Args

try:
    from corral.guest import protocol
    from corral.guest.agent_channels import EPOLLIN, EPOLLOUT, Channel, Refusal
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import (  # type: ignore[no-redef,import-not-found]
        EPOLLIN,
        EPOLLOUT,
        Channel,
        Refusal,
    )


def op_connect(agent: Agent, channel: int, args: Args) -> None:
    port = args.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise Refusal("invalid_argument", f"port {port!r} is not a TCP port (1 to 65535)")
    connection = Connection(agent, channel, port)
    agent.channels[channel] = connection
    connection.attempt()


class Connection(Channel):
    """One relayed TCP connection, from its connect to its end."""

    def __init__(self, agent: Agent, channel: int, port: int) -> None:
        super().__init__(agent, channel)
        self.port = port
        # Loopback over IPv4, then IPv6: a server on "localhost" may be on ::1 alone.
        self.targets = ["127.0.0.1", "::1"]
        self.sock: _socket.socket | None = None
        self.fd = -1
        self.credit = protocol.WINDOW  # OUT bytes the host lets us send
        self.pending = bytearray()  # IN bytes the socket has not taken yet
        self.host_eof = False
        self.open = False

    def attempt(self) -> None:
        """Connect to the next loopback address; when none answers, reply so."""
        import _socket

        while self.targets:
            host = self.targets.pop(0)
            family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
            try:
                sock = _socket.socket(family, _socket.SOCK_STREAM)
            except OSError:
                continue  # no IPv6 here
            sock.setblocking(False)
            code = sock.connect_ex((host, self.port))
            if code in (0, errno.EINPROGRESS):
                self.sock, self.fd = sock, sock.fileno()
                if code == 0:
                    self.connected()
                else:
                    self.agent.watch(self.fd, EPOLLOUT, self.on_connect)
                return
            sock.close()
        message = f"nothing listens on port {self.port} in the sandbox (127.0.0.1 or ::1)"
        self.end({"ok": False, "error": {"type": "refused", "message": message}})

    def on_connect(self, fd: int, events: int) -> None:
        import _socket

        assert self.sock is not None
        if self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR):
            self.agent.unwatch(self.fd)
            self.sock.close()
            self.sock, self.fd = None, -1
            self.attempt()
            return
        self.connected()

    def connected(self) -> None:
        self.open = True
        self.agent.send_json(protocol.EVENT, self.channel, {"connected": True})
        self.update_watch()

    def update_watch(self) -> None:
        if not self.open:
            return
        events = (EPOLLIN if self.credit > 0 else 0) | (EPOLLOUT if self.pending else 0)
        if events:
            self.agent.watch(self.fd, events, self.on_ready)
        else:
            self.agent.unwatch(self.fd)

    def on_ready(self, fd: int, events: int) -> None:
        if events & EPOLLOUT:
            self.write_pending()
        if self.open and events & ~EPOLLOUT:  # readable, hung up or failed: read says which
            self.read()
        self.update_watch()

    def read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(min(protocol.CHUNK, self.credit))
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset: the connection is over either way
        if not data:
            self.end({"ok": True})
            return
        self.credit -= len(data)
        self.agent.send(protocol.OUT, self.channel, data)

    def write_pending(self) -> None:
        assert self.sock is not None
        written = 0
        try:
            while self.pending:
                n = self.sock.send(self.pending)
                del self.pending[:n]
                written += n
        except BlockingIOError:
            pass
        except OSError:  # the peer is gone: what it will never read is dropped
            written += len(self.pending)
            self.pending.clear()
        self.agent.grant(self.channel, written)
        if self.host_eof and not self.pending and self.open:
            try:  # noqa: SIM105 (contextlib is one more import on the agent's start)
                self.sock.shutdown(1)  # SHUT_WR
            except OSError:
                pass

    def on_in(self, data: bytes) -> None:
        if not self.open:
            self.agent.grant(self.channel, len(data))
            return
        self.pending += data
        self.write_pending()
        self.update_watch()

    def on_eof(self) -> None:
        self.host_eof = True
        if self.open:
            self.write_pending()
            self.update_watch()

    def on_credit(self, amount: int) -> None:
        self.credit += amount
        self.update_watch()

    def on_close(self) -> None:
        """The host stopped listening: the connection ends, with nothing to reply."""
        self.close()

    def end(self, reply: Args) -> None:
        self.close()
        self.agent.reply(self.channel, reply)

    def close(self) -> None:
        self.open = False
        if self.sock is not None:
            self.agent.unwatch(self.fd)
            self.sock.close()
            self.sock, self.fd = None, -1

"""`AsyncSandbox`: create, connect to, list and manage sandboxes on a Corral server.

    async with await AsyncSandbox.create(timeout=120) as sbx:    # killed on exit
        result = await sbx.commands.run("python3 -c 'print(6 * 7)'")
        await sbx.files.write("data.csv", "a,b\\n1,2\\n")

The server and API key come from the arguments, else `CORRAL_SERVER` and
`CORRAL_API_KEY`, else the CLI's current context (see `corral context`).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from corral.client._commands import AsyncCommands
from corral.client._config import ClientSettings
from corral.client._connection import Connection
from corral.client._files import AsyncFiles
from corral.client._hybrid import hybridmethod
from corral.client._listing import list_request
from corral.client._models import (
    Limits,
    MetricPoint,
    Network,
    NetworkEvent,
    SandboxInfo,
    TemplateInfo,
    volume_mounts,
)
from corral.client._ports import port_host, port_url
from corral.client._pty import AsyncPty
from corral.errors import InvalidRequest, NotFound, SandboxNotRunning
from corral.v1 import sandbox_pb2 as pb
from corral.volumes import VolumeSpec

MetricsRange = Literal["10m", "2h", "24h"]
_RANGES = {"10m": pb.METRICS_RANGE_10M, "2h": pb.METRICS_RANGE_2H, "24h": pb.METRICS_RANGE_24H}


def _connect(
    server: str | None,
    api_key: str | None,
    context: str | None,
    ca_file: str | os.PathLike[str] | None,
    request_timeout: float | None,
) -> Connection:
    return Connection(
        ClientSettings.resolve(
            server=server,
            api_key=api_key,
            context=context,
            ca_file=ca_file,
            timeout=request_timeout,
        )
    )


async def kill_by_id(
    sandbox_id: str,
    *,
    api_key: str | None = None,
    server: str | None = None,
    context: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    request_timeout: float | None = None,
) -> bool:
    """Kill a sandbox by id: True if it was running or paused, False if already gone."""
    if not isinstance(sandbox_id, str):
        raise InvalidRequest(
            f"kill(sandbox_id) takes the sandbox id as a str, not {type(sandbox_id).__name__}"
        )
    connection = _connect(server, api_key, context, ca_file, request_timeout)
    try:
        reply = await connection.call(connection.rpc.get, pb.GetRequest(sandbox_id=sandbox_id))
        if SandboxInfo.from_proto(reply.sandbox).state in ("killed", "failed"):
            return False
        await connection.call(connection.rpc.kill, pb.KillRequest(sandbox_id=sandbox_id))
        return True
    except NotFound:
        return False
    finally:
        await connection.aclose()


def _network(
    network: Network | str | Mapping[str, Any] | None, allow_internet_access: bool | None
) -> Network | None:
    """The policy asked for; None when neither names one (the template's default, else
    `none`, applies)."""
    if allow_internet_access is None:
        return None if network is None else Network.of(network)
    if network is not None:
        raise InvalidRequest(
            "give network or allow_internet_access, not both (allow_internet_access=True "
            'is network="internet", False is network="none")'
        )
    if not isinstance(allow_internet_access, bool):
        raise InvalidRequest(
            f"allow_internet_access must be True or False, not {allow_internet_access!r}"
        )
    return Network.parse("internet" if allow_internet_access else "none")


def _mode(mode: object) -> str:
    if not isinstance(mode, str):
        raise InvalidRequest(
            "update_network(mode, allow=[...]) takes the mode as a string with allow; "
            "or pass a Network (or mapping) alone"
        )
    return mode


class AsyncSandbox:
    """A sandbox on a Corral server. Get one from `create` or `connect`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        # E2B habit: its `Sandbox()` starts a sandbox; an async constructor cannot.
        raise InvalidRequest(
            "AsyncSandbox() does not start a sandbox: use `await AsyncSandbox.create(...)`, "
            "or `await AsyncSandbox.connect(sandbox_id)` for an existing one"
        )

    @classmethod
    def _of(cls, info: SandboxInfo, connection: Connection) -> AsyncSandbox:
        """The handle on a sandbox the server told us about (from `create` or `connect`)."""
        sandbox = cls.__new__(cls)
        sandbox._info = info
        sandbox._connection = connection
        sandbox.commands = AsyncCommands(connection, info.sandbox_id)
        sandbox.pty = AsyncPty(connection, info.sandbox_id)
        sandbox.files = AsyncFiles(connection, info.sandbox_id)
        return sandbox

    _info: SandboxInfo
    _connection: Connection
    commands: AsyncCommands
    pty: AsyncPty
    files: AsyncFiles

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        """What the server said about the sandbox at the last call that returned it."""
        return self._info

    @property
    def network(self) -> Network:
        """Its network policy, as of the last call that returned the sandbox."""
        return self._info.network

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.sandbox_id} {self._info.state}>"

    # -- exposed ports --------------------------------------------------------------------

    @property
    def traffic_token(self) -> str:
        """What the port proxy asks for (header `X-Corral-Traffic-Token`); "" when the
        sandbox's ports are public."""
        return self._info.traffic_token

    def get_host(self, port: int) -> str:
        """The host name (and server port) of `port` inside the sandbox, as E2B's
        `get_host`: `<port>-<sandbox id>.<ports domain>`."""
        return port_host(self._info, self._connection.settings.server, port)

    def get_url(self, port: int, path: str = "/", *, host_form: bool = False) -> str:
        """A URL of `path` on `port` inside the sandbox, through the server, with the
        traffic token unless the ports are public; `host_form` uses `get_host`."""
        return port_url(
            self._info, self._connection.settings.server, port, path, host_form=host_form
        )

    # -- getting one ----------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        template: str = "host",
        *,
        timeout: int | None = None,
        idle_timeout: int | None = None,
        on_idle: Literal["pause", "kill"] = "pause",
        envs: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        isolation: str = "auto",
        limits: Limits | None = None,
        network: Network | str | Mapping[str, Any] | None = None,
        allow_internet_access: bool | None = None,
        public_ports: bool = False,
        volumes: Sequence[VolumeSpec | str | Mapping[str, Any]] | None = None,
        ram_disk: bool = False,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> AsyncSandbox:
        """Start a sandbox; it lives `timeout` seconds (server default 300) unless moved.

        `idle_timeout` seconds without activity (commands, files, pings) pause it, or
        kill it with `on_idle="kill"`. `envs` apply to every command run in it.
        `network` is what it may reach: "none" (the default, unless the template
        has one), "internet", or
        {"mode": "allowlist", "allow": ["pypi.org", "*.example.com:443", "203.0.113.0/24"]};
        E2B's `allow_internet_access=True` is "internet", False is "none". Its ports are
        reached through the server (`get_url`) with its `traffic_token`, or by anyone
        with `public_ports=True`. `volumes` mounts your team's named volumes
        (`Volume.create`): ["cache:/data", "models:/models:ro"], or VolumeSpecs.
        `ram_disk=True` keeps what a template's sandbox writes in memory (a tmpfs of its
        disk limit, less headroom), counted against its memory limit, instead of on a
        disk (a `host` sandbox's storage is a tmpfs anyway).
        """
        if not isinstance(ram_disk, bool):
            raise InvalidRequest(f"ram_disk={ram_disk!r}: use True or False")
        if on_idle not in ("pause", "kill"):
            raise InvalidRequest(f"on_idle={on_idle!r}: use 'pause' or 'kill'")
        policy = _network(network, allow_internet_access)
        mounts = volume_mounts(volumes)
        connection = _connect(server, api_key, context, ca_file, request_timeout)
        request = pb.CreateRequest(
            template=template,
            isolation=isolation,
            limits=(limits or Limits()).to_proto(),
            envs=dict(envs or {}),
            metadata=dict(metadata or {}),
            timeout_seconds=timeout or 0,
            idle_timeout_seconds=idle_timeout or 0,
            on_idle=pb.IDLE_ACTION_KILL if on_idle == "kill" else pb.IDLE_ACTION_PAUSE,
            network=policy.to_proto() if policy is not None else None,
            public_ports=bool(public_ports),
            volumes=mounts,
            ram_disk=ram_disk,
        )
        try:
            reply = await connection.call(connection.rpc.create, request)
        except BaseException:
            await connection.aclose()
            raise
        return cls._of(SandboxInfo.from_proto(reply.sandbox), connection)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        resume: bool = True,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> AsyncSandbox:
        """An existing sandbox of your team, resumed if it was paused.

        With `resume=False` it is left as it is, even killed (to read its `info`).
        """
        connection = _connect(server, api_key, context, ca_file, request_timeout)
        try:
            reply = await connection.call(connection.rpc.get, pb.GetRequest(sandbox_id=sandbox_id))
            info = SandboxInfo.from_proto(reply.sandbox)
            if not resume:
                pass
            elif info.state == "paused":
                resumed = await connection.call(
                    connection.rpc.resume, pb.ResumeRequest(sandbox_id=sandbox_id)
                )
                info = SandboxInfo.from_proto(resumed.sandbox)
            elif info.state in ("killed", "failed"):
                raise NotFound(f"sandbox {sandbox_id} is {info.state}: {info.state_reason}")
        except BaseException:
            await connection.aclose()
            raise
        return cls._of(info, connection)

    @classmethod
    async def list(
        cls,
        *,
        states: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> list[SandboxInfo]:
        """Your team's sandboxes (by default every one not killed or failed), all pages."""
        request = list_request(states, metadata)
        connection = _connect(server, api_key, context, ca_file, request_timeout)
        found: list[SandboxInfo] = []
        try:
            while True:
                reply = await connection.call(connection.rpc.list, request)
                found.extend(SandboxInfo.from_proto(s) for s in reply.sandboxes)
                if not reply.next_page_token:
                    return found
                request.page_token = reply.next_page_token
        finally:
            await connection.aclose()

    # -- this one -------------------------------------------------------------------------

    async def get_info(self) -> SandboxInfo:
        reply = await self._connection.call(
            self._connection.rpc.get, pb.GetRequest(sandbox_id=self.sandbox_id)
        )
        self._info = SandboxInfo.from_proto(reply.sandbox)
        return self._info

    async def is_running(self) -> bool:
        return (await self.get_info()).state == "running"

    async def _kill(self) -> None:
        """Kill every process and delete the sandbox; killing it twice is no error.

        `await AsyncSandbox.kill(sandbox_id)` kills one by id (as E2B's SDK does): True
        if it ran, False if it was already killed or is not your team's.
        """
        try:
            await self._connection.call(
                self._connection.rpc.kill, pb.KillRequest(sandbox_id=self.sandbox_id)
            )
        except SandboxNotRunning:
            # Killed already (by us, its timeout, or another client): done, as asked. Any
            # other state that refuses a kill (still creating) is the caller's to know.
            if (await self.get_info()).state not in ("killed", "failed"):
                raise

    kill = hybridmethod(_kill, kill_by_id)

    async def pause(self, *, keep_memory: bool = True) -> SandboxInfo:
        """Freeze it: its processes stop; memory and files stay, until `resume`. With
        `keep_memory=False`, pause it to disk: nothing of it runs and its memory is
        released; on a tier with memory snapshots (`gvisor`, network `none`) its
        memory is written to disk and `resume` restores it with its processes, elsewhere
        only its files stay and `resume` boots it afresh from them."""
        reply = await self._connection.call(
            self._connection.rpc.pause,
            pb.PauseRequest(sandbox_id=self.sandbox_id, keep_memory=keep_memory),
        )
        self._info = SandboxInfo.from_proto(reply.sandbox)
        return self._info

    async def resume(self) -> SandboxInfo:
        reply = await self._connection.call(
            self._connection.rpc.resume, pb.ResumeRequest(sandbox_id=self.sandbox_id)
        )
        self._info = SandboxInfo.from_proto(reply.sandbox)
        return self._info

    async def set_timeout(self, timeout: int) -> SandboxInfo:
        """Kill it `timeout` seconds from now (instead of at its current deadline)."""
        request = pb.SetTimeoutRequest(sandbox_id=self.sandbox_id, timeout_seconds=timeout)
        reply = await self._connection.call(self._connection.rpc.set_timeout, request)
        self._info = SandboxInfo.from_proto(reply.sandbox)
        return self._info

    async def update_network(
        self, mode: Network | str | Mapping[str, Any], allow: Sequence[str] = ()
    ) -> SandboxInfo:
        """Change what it may reach (connections already open stay open):
        `update_network("allowlist", allow=["pypi.org"])`, `update_network("none")`."""
        policy = Network.of(mode) if not allow else Network.parse(_mode(mode), allow)
        request = pb.UpdateNetworkRequest(sandbox_id=self.sandbox_id, network=policy.to_proto())
        reply = await self._connection.call(self._connection.rpc.update_network, request)
        self._info = SandboxInfo.from_proto(reply.sandbox)
        return self._info

    async def ping(self) -> None:
        """Count as activity: restarts its idle timer."""
        await self._connection.call(
            self._connection.rpc.ping, pb.PingRequest(sandbox_id=self.sandbox_id)
        )

    async def get_metrics(self, range: MetricsRange = "10m") -> builtins.list[MetricPoint]:
        if range not in _RANGES:
            raise InvalidRequest(f"range={range!r}: use 10m, 2h or 24h")
        request = pb.GetMetricsRequest(sandbox_id=self.sandbox_id, range=_RANGES[range])
        reply = await self._connection.call(self._connection.rpc.get_metrics, request)
        return [MetricPoint.from_proto(p) for p in reply.points]

    async def events(self, offset: int = 0, follow: bool = False) -> AsyncIterator[NetworkEvent]:
        """The sandbox's network events from seq `offset` on: DNS answers and refusals,
        connections allowed and denied, and counts of what the rate limit held back. With
        `follow`, until the sandbox ends. Seqs have no gaps: a first seq above `offset`
        is the count of older events the server's cap deleted."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest(f"offset={offset!r} must be a whole number >= 0")
        request = pb.StreamEventsRequest(sandbox_id=self.sandbox_id, offset=offset, follow=follow)
        async for message in self._connection.stream(self._connection.rpc.stream_events, request):
            for event in message.events:
                yield NetworkEvent.from_proto(event)

    async def snapshot(self, name: str, *, flatten: bool = False) -> TemplateInfo:
        """Save this sandbox's file system (its template and what it wrote) as the
        template `name` of your team; sandboxes started from it see the same files.
        `flatten` merges it all into one layer (wrenn's FlattenRootfs)."""
        from corral.v1 import templates_pb2

        request = templates_pb2.SnapshotSandboxRequest(
            sandbox_id=self.sandbox_id, name=name, flatten=flatten
        )
        connection = self._connection
        reply = await connection.call(connection.templates.snapshot, request)
        return TemplateInfo.from_proto(reply.template)

    async def aclose(self) -> None:
        """Close the connection; the sandbox goes on (see `kill`)."""
        await self._connection.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill()
        except NotFound:
            pass
        finally:
            await self.aclose()

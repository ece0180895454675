"""One live sandbox: launch, commands and files through the guest agent, pause, destroy.

All of this is the same for every isolation tier: a backend only supplies the
`LaunchPlan`. The order of creation is what makes cleanup certain: footprint record,
then cgroup, then storage, then the launcher process joined to the cgroup *before* exec,
so every process a sandbox ever runs is inside its cgroup and dies with it.

A one-shot sandbox runs its `Entrypoint` in place of the agent: its `entry` is that
command, and it has no exec or file operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from corral import tracing
from corral._aio import stop_tasks
from corral.errors import (
    CorralError,
    GuestError,
    InvalidLimits,
    InvalidRequest,
    IsolationUnavailable,
    SandboxNotRunning,
    SandboxStartFailed,
    SnapshotUnavailable,
)
from corral.guest import EntryInfo, GuestConnection, GuestWatch
from corral.guest import ProcessInfo as ProcessInfo
from corral.images import Layer, LayerStore
from corral.isolation.backend import Backend, Entrypoint, SandboxSpec, check_command_timeout
from corral.isolation.cgroups import Cgroup, CgroupDriver, CgroupUsage
from corral.isolation.command import Command, CommandResult
from corral.isolation.entry import EntryProcess
from corral.isolation.footprint import Footprint
from corral.isolation.guest_socket import bridge
from corral.isolation.launcher import Launcher, launch
from corral.isolation.network import SandboxNetwork
from corral.isolation.port_socket import connect_port, open_netns
from corral.isolation.rootfs import upper_dir
from corral.isolation.snapshots import upper_layer
from corral.limits import MIB, Limits
from corral.network.events import NetworkEventLog
from corral.network.policy import NetworkPolicy, Rule
from corral.terminal import PtySize

log = logging.getLogger("corral.isolation")

_STDERR_TAIL = 4096


class SandboxState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    DESTROYED = "destroyed"


# Resource use of a whole sandbox is exactly what its cgroup reports.
Usage = CgroupUsage


class Sandbox:
    """A live sandbox. Create it with `Engine.create`; always `destroy` it."""

    def __init__(
        self,
        spec: SandboxSpec,
        backend: Backend,
        footprint: Footprint,
        cgroup: Cgroup | None,
    ) -> None:
        self.id = footprint.id
        self.spec = spec
        self.backend = backend.name
        self.state = SandboxState.RUNNING
        self._backend = backend
        self.footprint = footprint
        self._cgroup = cgroup
        self._launcher: Launcher | None = None
        self._guest: GuestConnection | None = None
        self._entry: EntryProcess | None = None
        # The command of a one-shot sandbox; None when the sandbox has a guest agent.
        self.entry: Command | None = None
        self._stderr_tail = b""
        self._stderr_task: asyncio.Task[None] | None = None
        self._destroy_lock = asyncio.Lock()
        # Pause, resume and snapshot: a snapshot's thaw must not undo a pause meanwhile.
        self._freezer = asyncio.Lock()
        # Connections relayed by the guest agent (`open_port` without root), ended on destroy.
        self._relays: set[asyncio.Task[None]] = set()
        self.workdir = ""
        # What its network did (DNS, connections), for the services to store.
        self.network_events = NetworkEventLog()
        self._network: SandboxNetwork | None = None

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    async def launch(
        cls,
        backend: Backend,
        spec: SandboxSpec,
        footprint: Footprint,
        driver: CgroupDriver | None,
        entrypoint: Entrypoint | None = None,
    ) -> Sandbox:
        cgroup = None
        # The footprint names the cgroup (recorded before it exists) when there is a driver.
        if driver is not None and footprint.cgroup is not None:
            try:
                with tracing.span("engine.cgroup"):
                    cgroup = driver.create(footprint.cgroup, backend.cgroup_limits(spec.limits))
            except BaseException:
                footprint.release()
                raise
        sandbox = cls(spec, backend, footprint, cgroup)
        try:
            with tracing.span("engine.start"):
                await sandbox._start(entrypoint)
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    @property
    def netns_path(self) -> str | None:
        """The sandbox's network namespace (a file for setns), None with network none."""
        return self.footprint.netns

    async def _start(self, entrypoint: Entrypoint | None) -> None:
        made: asyncio.Future[None] | None = None
        if self.spec.network.mode != "none":
            # Made in a thread while the launch is prepared; the launcher's gate opens
            # only once it is done, so no sandbox code runs before its rules are in.
            self._network = SandboxNetwork(
                self.id,
                self.footprint,
                self._backend.settings,
                self.spec.network,
                self.spec.limits,
                self.network_events,
            )
            self._network.reserve()
            made = asyncio.ensure_future(self._make_network(self._network))
        try:
            await self._launch(entrypoint, made)
        except BaseException:
            if made is not None:  # never remove a namespace while it is being made
                await asyncio.wait({made})
                if not made.cancelled():
                    made.exception()  # seen: the error to report is the one raised
            raise

    async def _make_network(self, network: SandboxNetwork) -> None:
        with tracing.span("engine.network", {"corral.network.mode": self.spec.network.mode}):
            await network.make()
            await asyncio.to_thread(self._backend.attach_network, self.footprint)

    async def _launch(
        self, entrypoint: Entrypoint | None, network: asyncio.Future[None] | None
    ) -> None:
        with tracing.span("engine.plan"):  # its root file system, devices, arguments
            plan = self._backend.plan(self.footprint, self.spec, entrypoint)
        self.workdir = plan.workdir
        procs = self._cgroup.procs_files() if self._cgroup else []
        try:
            with tracing.span("engine.launch"):
                self._launcher = await launch(
                    plan.argv,
                    env=plan.env,
                    cwd=plan.host_cwd,
                    pass_fds=plan.pass_fds,
                    cgroup_procs=procs,
                    open_files=self.spec.limits.open_files if plan.host_rlimits else None,
                    file_size=self.spec.limits.file_size_mib * MIB if plan.host_rlimits else None,
                    uid=plan.uid,
                    gid=plan.gid,
                    netns=plan.netns,
                    userns=plan.userns,
                    ready=network,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxStartFailed(f"sandbox {self.id} could not be launched: {exc}") from exc
        finally:
            for fd in plan.pass_fds:
                os.close(fd)
        if entrypoint is not None:
            self._entry = EntryProcess(
                self._launcher,
                entrypoint.timeout,
                entrypoint.output_limit or self.spec.limits.output_bytes,
                plan.exec_failure,
                plan.signal_fifo,
            )
            self.entry = Command(self._entry, self.oom_kills, 0)
            return
        self._stderr_task = asyncio.create_task(self._keep_stderr(self._launcher.stderr))
        self._guest = GuestConnection(self._launcher.stdout, self._launcher.stdin)
        await self._guest.start()
        try:
            await asyncio.wait_for(self._guest.ping(), self._backend.start_timeout)
        except (GuestError, TimeoutError) as exc:
            await self._launcher_gone()
            detail = self._stderr_tail.decode(errors="replace").strip()
            said = self._backend.start_failure_detail(self.footprint)
            detail = "\n".join(part for part in (detail, said) if part) or str(exc)
            raise SandboxStartFailed(f"sandbox {self.id} did not start: {detail}") from None
        if self.spec.restore is not None:
            await self._after_restore()

    async def _after_restore(self) -> None:
        """Set what a guest kernel kept of the checkpoint that no longer holds: its clock
        (it stood still on disk) and its host name (the checkpointed sandbox's, when
        restored into another)."""
        hostname = self.id.replace("_", "-")
        for what, argv in (
            ("clock", self._backend.clock_command()),
            ("host name", self._backend.identity_command(hostname)),
        ):
            if argv is None:
                continue
            done = await (await self.exec(argv, user="root")).collect()
            if not done.ok:
                log.warning(
                    "could not set a restored sandbox's %s",
                    what,
                    extra={"sandbox_id": self.id, "stderr": done.stderr[-300:]},
                )

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        """Keep the tail of the launcher's stderr for error messages; log it too."""
        while line := await stream.readline():
            self._stderr_tail = (self._stderr_tail + line)[-_STDERR_TAIL:]
            log.debug(
                "launcher said",
                extra={"sandbox_id": self.id, "line": line.decode(errors="replace").rstrip()},
            )

    async def _launcher_gone(self) -> None:
        if self._launcher is not None and self._launcher.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._launcher.wait(), 1.0)
        if self._stderr_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)

    async def pause(self) -> None:
        """Freeze every process: they stop using CPU until `resume`."""
        async with self._freezer:
            self._require(SandboxState.RUNNING)
            cgroup = self._require_cgroup("pause")
            await asyncio.to_thread(cgroup.freeze)
            self.state = SandboxState.PAUSED

    async def resume(self) -> None:
        async with self._freezer:
            self._require(SandboxState.PAUSED)
            await asyncio.to_thread(self._require_cgroup("resume").thaw)
            self.state = SandboxState.RUNNING

    async def snapshot(self, store: LayerStore, *, max_bytes: int | None = None) -> tuple[str, ...]:
        """The layers (bottom first, in `store`) of a root that is this sandbox's `/` as it
        is now: its template's layers and one new layer of what it changed. The sandbox is
        frozen while its changes are read and resumes after, unless it was paused.

        SnapshotUnavailable for a sandbox of `host` (its root is the host's /usr, not
        layers; its writable dirs alone would make no template); QuotaExceeded past
        `max_bytes` of file data, with nothing stored."""
        template = self.spec.rootfs
        if template is None:
            raise SnapshotUnavailable(
                f"sandbox {self.id} runs the template {self.spec.template!r}, whose root is "
                "the host's, not layers: snapshot sandboxes of a layer template"
            )
        if max_bytes is not None and max_bytes < 0:
            raise InvalidRequest(f"max_bytes={max_bytes} must be a number of bytes, 0 or more")
        for digest in template.digests:
            store.get(digest)  # UnknownLayer: the template's layers are in another store
        ids = self.footprint.layer_ids
        assert ids is not None  # recorded by rootfs.make_root with the layers' idmap
        async with self._freezer:
            if self.state is SandboxState.DESTROYED:
                raise SandboxNotRunning(f"sandbox {self.id} is destroyed")
            cgroup = self._require_cgroup("snapshot")
            paused = self.state is SandboxState.PAUSED
            flush = self._backend.snapshot_flush()
            if flush is not None:  # its files are in a guest kernel's cache until written
                if paused:
                    raise IsolationUnavailable(
                        f"sandbox {self.id} is paused and its guest has not written its "
                        "files out: resume it, then snapshot it"
                    )
                await (await self.exec(flush, user="root")).collect()
            if not paused:
                await asyncio.to_thread(cgroup.freeze)
            reading = asyncio.ensure_future(
                asyncio.to_thread(self._read_upper, store, (ids[0], ids[1], ids[2]), max_bytes)
            )
            try:
                layer = await asyncio.shield(reading)
            except CorralError as exc:
                if self._destroyed():  # its disk went away under the reader
                    raise SandboxNotRunning(f"sandbox {self.id} was destroyed") from exc
                raise
            finally:
                # Never thawed while the host reads its upper dir (a cancelled caller
                # included): a running sandbox could swap a directory for a symlink to a
                # host path under the reader.
                while not reading.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({reading})
                # Not if destroyed meanwhile: destroy thaws it to kill it.
                if not paused and not self._destroyed():
                    await asyncio.to_thread(cgroup.thaw)
        return (*template.digests, layer.digest)

    async def checkpoint(self, image: Path) -> None:
        """Write this sandbox whole (memory, processes, writable filesystem) into the new
        directory `image`, then destroy it: nothing of it runs any more and its memory is
        the host's again. `Engine.create(restore=image, ...)` brings it back.

        Its calls in flight end (SandboxNotRunning) and no command's stream survives the
        restore; its processes do, background commands included (attach to them by pid).
        A paused (frozen) sandbox is thawed for its agent to let go of its calls. Refused
        before anything changes where the tier cannot checkpoint it (IsolationUnavailable,
        `Backend.check_checkpoint`), for a one-shot sandbox, and when `image` exists or
        its parent does not (InvalidRequest). Once its agent has let go, a failure
        destroys it too (and removes `image`): it has no connection to go on with.
        """
        self._backend.check_checkpoint(self.spec, "checkpoint a sandbox")
        if self.entry is not None:
            raise InvalidRequest(
                f"sandbox {self.id} runs one command without a guest agent: it cannot be "
                "checkpointed"
            )
        started = False
        try:
            async with self._freezer:
                if self._destroyed():
                    raise SandboxNotRunning(f"sandbox {self.id} is destroyed")
                guest = self._guest
                if guest is None or guest.closed:
                    raise GuestError(f"sandbox {self.id} has no working guest agent; destroy it")
                try:
                    image.mkdir(mode=0o700)
                except (FileExistsError, FileNotFoundError) as exc:
                    raise InvalidRequest(
                        f"cannot checkpoint sandbox {self.id} into {str(image)!r}: "
                        f"{exc.strerror}; give a new directory whose parent exists"
                    ) from None
                started = True
                try:
                    await self._write_checkpoint(guest, image)
                except BaseException:
                    shutil.rmtree(image, ignore_errors=True)
                    raise
        finally:
            if started:
                await self.destroy()

    async def _write_checkpoint(self, guest: GuestConnection, image: Path) -> None:
        if self.state is SandboxState.PAUSED:
            await asyncio.to_thread(self._require_cgroup("checkpoint").thaw)
            self.state = SandboxState.RUNNING
        await asyncio.wait_for(
            guest.detach(f"sandbox {self.id} was checkpointed"), self._backend.start_timeout
        )
        writing = asyncio.ensure_future(
            asyncio.to_thread(self._backend.checkpoint, self.footprint, image)
        )
        try:
            await asyncio.shield(writing)
        finally:
            # A cancelled caller: the tier is still at work in its thread, and destroying
            # the sandbox under it would race its writer.
            while not writing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({writing})

    def _read_upper(
        self, store: LayerStore, ids: tuple[int, int, int], max_bytes: int | None
    ) -> Layer:
        with self._backend.snapshot_files(self.footprint):
            return upper_layer(store, upper_dir(self.footprint), ids, max_bytes)

    async def destroy(self) -> None:
        """Kill every process and remove every trace: cgroup, mounts, files. Idempotent."""
        async with self._destroy_lock:
            if self.state is SandboxState.DESTROYED:
                return
            self.state = SandboxState.DESTROYED
            if self._guest is not None:  # before the agent dies: its death is no failure
                self._guest.abort(f"sandbox {self.id} was killed")
            # A snapshot in flight reads its upper dir first: thawed to be killed, the
            # sandbox could race the reader (see `snapshot`).
            async with self._freezer:
                await self._stop_launcher()
            if self._network is not None:
                await self._network.close()
            if self._entry is not None:
                self._entry.close()
            if self._guest is not None:
                await self._guest.aclose()
            released = await asyncio.to_thread(self._remove_host_state)
            if self._launcher is not None and self._launcher.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._launcher.pid, signal.SIGKILL)
                await self._launcher.wait()
            await stop_tasks(self._stderr_task, *self._relays)
            if not released:
                await asyncio.to_thread(self.footprint.release)

    def _remove_host_state(self) -> bool:
        """Destroy the cgroup (killing every process in it) and, once the launcher has
        exited, release the footprint — one trip to a thread. True if released."""
        if self._cgroup is not None:
            self._cgroup.destroy()
        if self._launcher is not None and self._launcher.returncode is None:
            return False  # still exiting: released after it is reaped
        self.footprint.release()
        return True

    async def _stop_launcher(self) -> None:
        """Kill the launcher's children (or, before it has any, the launcher itself).

        For bubblewrap the child is the pid namespace's init: killing it takes down every
        process in the namespace at once, and the launcher, still alive, reaps it.
        """
        launcher = self._launcher
        if launcher is None or launcher.returncode is not None:
            return
        if self._cgroup is not None and self._cgroup.frozen():
            await asyncio.to_thread(self._cgroup.thaw)  # frozen tasks can't exit
        launcher.kill_tree()
        try:
            await asyncio.wait_for(launcher.wait(), 2.0)
        except TimeoutError:
            log.warning(
                "launcher did not exit; killing it",
                extra={"sandbox_id": self.id, "launcher_pid": launcher.pid},
            )

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    # -- commands ---------------------------------------------------------------------

    async def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        home: bool = False,
        timeout: float | None = None,
        output_limit: int | None = None,
        stdin: bool = False,
        background: bool = False,
        tag: str | None = None,
        pty: PtySize | None = None,
    ) -> Command:
        """Start a command; iterate the result for output, `wait()` for its end. With
        `home` it starts in its user's home, which a relative `cwd` is resolved from.

        The sandbox's default output limit is for output a caller collects; a terminal
        (`pty`) is a stream someone watches for as long as it runs, so it has none unless
        `output_limit` says so.
        """
        check_command_timeout(timeout)
        guest = self._running_guest()
        before = self.oom_kills()
        process = await guest.exec(
            command,
            env=env,
            cwd=cwd,
            user=user,
            home=home,
            timeout=timeout,
            output_limit=output_limit or (None if pty else self.spec.limits.output_bytes),
            stdin=stdin,
            background=background,
            tag=tag,
            pty=pty,
        )
        return Command(process, self.oom_kills, before)

    async def run(
        self,
        command: Sequence[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        output_limit: int | None = None,
    ) -> CommandResult:
        """Run a command to its end and return its whole output (as `user`: a name or
        uid of the sandbox, its template's default user if None)."""
        cmd = await self.exec(
            command, env=env, cwd=cwd, user=user, timeout=timeout, output_limit=output_limit
        )
        return await cmd.collect()

    async def attach(self, pid: int) -> Command:
        guest = self._running_guest()
        return Command(await guest.attach(pid), self.oom_kills, self.oom_kills())

    async def processes(self) -> list[ProcessInfo]:
        return await self._running_guest().processes()

    async def signal(self, pid: int, signum: int, *, group: bool = False) -> None:
        await self._running_guest().signal(pid, signum, group=group)

    async def resize(self, pid: int, size: PtySize) -> None:
        await self._running_guest().resize(pid, size)

    async def write_input(self, pid: int, data: bytes) -> None:
        await self._running_guest().write_input(pid, data)

    async def close_input(self, pid: int) -> None:
        await self._running_guest().close_input(pid)

    # -- files ------------------------------------------------------------------------

    # Each file call acts as `user` (None: the template's default user) and, with `home`,
    # resolves relative paths from that user's home directory (see GuestConnection).

    def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> AsyncIterator[bytes]:
        return self._running_guest().read_file(
            path, offset=offset, length=length, user=user, home=home
        )

    async def read_bytes(self, path: str) -> bytes:
        return await self._running_guest().read_bytes(path)

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes] | Iterable[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
        in_place: bool = False,
        metadata: Mapping[str, str] | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo:
        return await self._running_guest().write_file(
            path,
            data,
            mode=mode,
            append=append,
            in_place=in_place,
            metadata=metadata,
            user=user,
            home=home,
        )

    async def list_dir(
        self, path: str, *, depth: int = 1, user: str | None = None, home: bool = False
    ) -> list[EntryInfo]:
        return await self._running_guest().list_dir(path, depth=depth, user=user, home=home)

    async def stat(self, path: str, *, user: str | None = None, home: bool = False) -> EntryInfo:
        return await self._running_guest().stat(path, user=user, home=home)

    async def make_dir(self, path: str, *, user: str | None = None, home: bool = False) -> bool:
        return await self._running_guest().make_dir(path, user=user, home=home)

    async def remove(
        self, path: str, *, recursive: bool = False, user: str | None = None, home: bool = False
    ) -> None:
        await self._running_guest().remove(path, recursive=recursive, user=user, home=home)

    async def rename(
        self,
        src: str,
        dst: str,
        *,
        overwrite: bool = True,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo | None:
        return await self._running_guest().rename(
            src, dst, overwrite=overwrite, user=user, home=home
        )

    async def watch(
        self,
        path: str,
        *,
        recursive: bool = False,
        entries: bool = False,
        user: str | None = None,
        home: bool = False,
    ) -> GuestWatch:
        return await self._running_guest().watch(
            path, recursive=recursive, entries=entries, user=user, home=home
        )

    async def sync(self) -> None:
        """Wait until every watch event of changes made before now has arrived."""
        await self._running_guest().sync()

    # -- ports ------------------------------------------------------------------------

    async def open_port(self, port: int) -> socket.socket:
        """A TCP connection from the host to 127.0.0.1:`port` inside this sandbox (its
        network namespace), for the port proxy; the caller closes it. PortClosed when
        nothing listens there."""
        self._require(SandboxState.RUNNING)
        launcher = self._launcher
        if launcher is None:
            raise SandboxNotRunning(f"sandbox {self.id} has not started")
        if not self._backend.host_reaches_ports(self.footprint):
            return await self.open_port_via_agent(port)
        # bubblewrap's child is the sandbox's init, in its namespaces; a tier without
        # one of its own (process) is in the launcher's, which is the host's.
        inside = (launcher.children() or [launcher.pid])[0]
        fd = open_netns(
            inside,
            lambda: (
                launcher.returncode is None
                and (inside == launcher.pid or inside in launcher.children())
            ),
        )
        if fd < 0:
            raise SandboxNotRunning(f"sandbox {self.id} has exited")
        try:
            return await connect_port(fd, port, where=f"sandbox {self.id}")
        except PermissionError:  # the host may not enter it (not root): the agent may
            return await self.open_port_via_agent(port)
        finally:
            os.close(fd)

    async def open_port_via_agent(self, port: int) -> socket.socket:
        """`open_port` through the guest agent: its `connect`, relayed to a local socket.
        The path where the host cannot enter the sandbox's network namespace."""
        stream = await self._running_guest().connect(port)
        sock, relay = await bridge(stream)
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        return sock

    # -- limits and usage -------------------------------------------------------------

    async def set_network(self, policy: NetworkPolicy) -> None:
        """Change what the sandbox may reach, in one atomic swap of its rules; connections
        already open stay open. A sandbox made with network `none` has no uplink to
        open: it stays `none`."""
        if self.state is SandboxState.DESTROYED:
            raise SandboxNotRunning(f"sandbox {self.id} is destroyed")
        if policy == self.spec.network:
            return
        self._backend.check_network(policy)
        if self._network is None:
            raise IsolationUnavailable(
                f"sandbox {self.id} was created with network 'none' and has no uplink; "
                "create a new sandbox with network 'internet' or 'allowlist' to change "
                "its network later"
            )
        await self._network.set_policy(policy)
        # The policy last loaded (another change may have finished after this one).
        self.spec = replace(self.spec, network=self._network.policy)

    async def allow(self, rule: Rule, addresses: list[str], ttl: float) -> None:
        """Let the sandbox connect to `addresses`, which its resolver just answered for a
        name `rule` allows, on `rule`'s ports, for `ttl` seconds (at least a minute).
        The resolver awaits this before it answers, so the connection that follows is
        allowed."""
        if self._network is not None:
            await self._network.allow(rule, addresses, ttl)

    def set_limits(self, limits: Limits) -> None:
        """Change memory, CPU, process and output limits of the live sandbox.

        Storage size, open files and file size are fixed when the sandbox starts (a tmpfs
        and rlimits); asking to change them is refused and changes nothing.
        """
        fixed = [
            name
            for name in ("disk_mib", "open_files", "file_size_mib")
            if getattr(limits, name) != getattr(self.spec.limits, name)
        ]
        if fixed:
            raise InvalidLimits(
                f"{', '.join(fixed)} cannot change after a sandbox starts; create a new one"
            )
        self._require(SandboxState.RUNNING)
        if limits == self.spec.limits:
            return
        self._require_cgroup("set_limits").set_limits(self._backend.cgroup_limits(limits))
        self.spec = replace(self.spec, limits=limits)

    # -- usage ------------------------------------------------------------------------

    def usage(self) -> Usage:
        return self._require_cgroup("usage").usage()

    def oom_kills(self) -> int:
        if self._cgroup is None or self.state is SandboxState.DESTROYED:
            return 0
        return self._cgroup.oom_kills()

    # -- guards -----------------------------------------------------------------------

    def _destroyed(self) -> bool:
        return self.state is SandboxState.DESTROYED or self._destroy_lock.locked()

    def _require(self, state: SandboxState) -> None:
        if self.state is not state:
            raise SandboxNotRunning(
                f"sandbox {self.id} is {self.state}; this needs it {state}"
                + ("" if self.state is not SandboxState.PAUSED else " (resume it first)")
            )

    def _require_cgroup(self, what: str) -> Cgroup:
        if self._cgroup is None:
            raise IsolationUnavailable(
                f"{what} needs cgroups, which this sandbox has none of; run `corral doctor`"
            )
        return self._cgroup

    def _running_guest(self) -> GuestConnection:
        self._require(SandboxState.RUNNING)
        if self.entry is not None:
            raise InvalidRequest(
                f"sandbox {self.id} runs one command and has no guest agent: "
                "it takes no commands or file operations"
            )
        if self._guest is None or self._guest.closed:
            raise GuestError(f"sandbox {self.id} has no working guest agent; destroy it")
        return self._guest

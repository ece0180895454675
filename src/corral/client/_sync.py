"""The sync SDK: each class wraps its async twin and runs it on the portal (`_portal`).

Methods returning plain data are derived with `bridge`, async iterators with
`_bridge_iterator`; only methods returning another SDK object (a sandbox, a command
handle) are written out, to wrap what they return.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, Unpack, overload

from corral.client._commands import (
    AsyncCommandHandle,
    AsyncCommands,
    DataCallback,
    OutputCallback,
    RunOptions,
)
from corral.client._files import AsyncFiles, ReadFormat, check_format
from corral.client._hybrid import hybridmethod
from corral.client._jobs import DEFAULT_RECONNECT_TIMEOUT, AsyncJobs
from corral.client._listing import list_sandboxes
from corral.client._models import BuildLog, CommandResult, Network, SandboxInfo
from corral.client._portal import bridge, bridge_factory, run
from corral.client._pty import AsyncPty
from corral.client._sandbox import AsyncSandbox, kill_by_id
from corral.client._templates import AsyncTemplate, TemplateBuilder
from corral.client._vms import AsyncVm
from corral.client._volumes import AsyncVolume
from corral.errors import InvalidRequest

P = ParamSpec("P")
R = TypeVar("R")


def _bridge_iterator(
    method: Callable[Concatenate[Any, P], AsyncIterator[R]],
) -> Callable[Concatenate[Any, P], Iterator[R]]:
    """The sync version of an async-iterator method: each item fetched on the portal."""

    def sync_method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        return _iterate(method(self._async, *args, **kwargs))

    functools.update_wrapper(sync_method, method)
    return sync_method


async def _next(iterator: AsyncIterator[R]) -> R:
    return await anext(iterator)


def _iterate(iterator: AsyncIterator[R]) -> Iterator[R]:
    try:
        while True:
            try:
                item = run(_next(iterator))
            except StopAsyncIteration:
                return
            yield item
    finally:
        # Left early (break, an error, Ctrl-C): close the async side's stream too.
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                run(aclose())


class CommandHandle:
    """A command started with `background=True`: pid, stdin, signals, result."""

    def __init__(self, handle: AsyncCommandHandle) -> None:
        self._async = handle
        self.pid = handle.pid

    @property
    def stdout(self) -> str:
        return self._async.stdout

    @property
    def stderr(self) -> str:
        return self._async.stderr

    wait = bridge(AsyncCommandHandle.wait)
    kill = bridge(AsyncCommandHandle.kill)
    send_stdin = bridge(AsyncCommandHandle.send_stdin)
    close_stdin = bridge(AsyncCommandHandle.close_stdin)
    signal = bridge(AsyncCommandHandle.signal)
    disconnect = bridge(AsyncCommandHandle.disconnect)


class Commands:
    __doc__ = AsyncCommands.__doc__

    def __init__(self, commands: AsyncCommands) -> None:
        self._async = commands

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        **options: Unpack[RunOptions],
    ) -> CommandResult: ...

    @overload
    def run(
        self, cmd: str | Sequence[str], *, background: Literal[True], **options: Unpack[RunOptions]
    ) -> CommandHandle: ...

    def run(
        self, cmd: str | Sequence[str], *, background: bool = False, **options: Unpack[RunOptions]
    ) -> CommandResult | CommandHandle:
        if background:
            return CommandHandle(run(self._async.run(cmd, background=True, **options)))
        return run(self._async.run(cmd, background=False, **options))

    run.__doc__ = AsyncCommands.run.__doc__

    def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        raw_output: bool = False,
    ) -> CommandHandle:
        handle = self._async.connect(
            pid, on_stdout=on_stdout, on_stderr=on_stderr, raw_output=raw_output
        )
        return CommandHandle(run(handle))

    connect.__doc__ = AsyncCommands.connect.__doc__

    list = bridge(AsyncCommands.list)
    kill = bridge(AsyncCommands.kill)
    send_stdin = bridge(AsyncCommands.send_stdin)
    close_stdin = bridge(AsyncCommands.close_stdin)


class Pty:
    __doc__ = AsyncPty.__doc__

    def __init__(self, pty: AsyncPty) -> None:
        self._async = pty

    def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        on_data: DataCallback | None = None,
        cmd: str | Sequence[str] | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        background: bool = True,
    ) -> CommandHandle:
        handle = self._async.create(
            cols,
            rows,
            on_data=on_data,
            cmd=cmd,
            envs=envs,
            cwd=cwd,
            user=user,
            timeout=timeout,
            background=background,
        )
        return CommandHandle(run(handle))

    create.__doc__ = AsyncPty.create.__doc__

    def connect(self, pid: int, *, on_data: DataCallback | None = None) -> CommandHandle:
        return CommandHandle(run(self._async.connect(pid, on_data=on_data)))

    connect.__doc__ = AsyncPty.connect.__doc__

    send_stdin = bridge(AsyncPty.send_stdin)
    resize = bridge(AsyncPty.resize)
    kill = bridge(AsyncPty.kill)


class Files:
    __doc__ = AsyncFiles.__doc__

    def __init__(self, files: AsyncFiles) -> None:
        self._async = files

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...

    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...

    @overload
    def read(self, path: str, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(self, path: str, format: ReadFormat = "text") -> str | bytes | Iterator[bytes]:
        check_format(format)
        if format == "stream":
            return _iterate(self._async.read_stream(path))
        if format == "bytes":
            return run(self._async.read_bytes(path))
        return run(self._async.read(path))

    read.__doc__ = AsyncFiles.read.__doc__
    read_stream = _bridge_iterator(AsyncFiles.read_stream)
    read_bytes = bridge(AsyncFiles.read_bytes)
    write = bridge(AsyncFiles.write)
    list = bridge(AsyncFiles.list)
    get_info = bridge(AsyncFiles.get_info)
    exists = bridge(AsyncFiles.exists)
    make_dir = bridge(AsyncFiles.make_dir)
    remove = bridge(AsyncFiles.remove)
    rename = bridge(AsyncFiles.rename)


class Sandbox:
    """A sandbox on a Corral server (sync API). Get one from `create` or `connect`.

    with Sandbox.create(timeout=120) as sbx:       # killed on exit
        print(sbx.commands.run("echo hi").stdout)
    """

    def __init__(self, template: str = "host", **options: Any) -> None:
        """`Sandbox(...)` starts one, as `Sandbox.create(...)` does (E2B's SDK has both)."""
        if not isinstance(template, str):
            raise InvalidRequest(
                f"Sandbox(template) takes a template name, not {type(template).__name__}: "
                "start one with `Sandbox.create(...)`, reach one with `Sandbox.connect(id)`"
            )
        self._bind(run(AsyncSandbox.create(template, **options)))

    def _bind(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox
        self.commands = Commands(sandbox.commands)
        self.pty = Pty(sandbox.pty)
        self.files = Files(sandbox.files)

    @classmethod
    def _of(cls, sandbox: AsyncSandbox) -> Sandbox:
        wrapped = cls.__new__(cls)
        wrapped._bind(sandbox)
        return wrapped

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        return self._async.info

    @property
    def network(self) -> Network:
        return self._async.network

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id} {self.info.state}>"

    @property
    def traffic_token(self) -> str:
        return self._async.traffic_token

    def get_host(self, port: int) -> str:
        return self._async.get_host(port)

    def get_url(self, port: int, path: str = "/", *, host_form: bool = False) -> str:
        return self._async.get_url(port, path, host_form=host_form)

    create = staticmethod(bridge_factory(AsyncSandbox.create, lambda box: Sandbox._of(box)))
    connect = staticmethod(bridge_factory(AsyncSandbox.connect, lambda box: Sandbox._of(box)))
    list = staticmethod(list_sandboxes)  # plain HTTP: no event loop needed

    get_info = bridge(AsyncSandbox.get_info)
    is_running = bridge(AsyncSandbox.is_running)
    kill = hybridmethod(
        bridge(AsyncSandbox._kill), bridge_factory(kill_by_id, lambda killed: killed)
    )
    pause = bridge(AsyncSandbox.pause)
    resume = bridge(AsyncSandbox.resume)
    set_timeout = bridge(AsyncSandbox.set_timeout)
    update_network = bridge(AsyncSandbox.update_network)
    ping = bridge(AsyncSandbox.ping)
    get_metrics = bridge(AsyncSandbox.get_metrics)
    events = _bridge_iterator(AsyncSandbox.events)
    snapshot = bridge(AsyncSandbox.snapshot)
    close = bridge(AsyncSandbox.aclose)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        run(self._async.__aexit__(*exc))


class Jobs:
    """Your team's jobs on a Corral server (sync API; `AsyncJobs` for asyncio).

    with Jobs() as jobs:
        job = jobs.submit(run="make test", retries=2).job
        for chunk in jobs.logs(job.id, follow=True):
            print(chunk.data.decode(), end="")
        print(jobs.wait(job.id).state)
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        self._async = AsyncJobs(
            server,
            api_key,
            context,
            ca_file=ca_file,
            request_timeout=request_timeout,
            reconnect_timeout=reconnect_timeout,
        )

    @property
    def server(self) -> str:
        return self._async.server

    def __repr__(self) -> str:
        return f"<Jobs {self.server}>"

    submit = bridge(AsyncJobs.submit)
    get = bridge(AsyncJobs.get)
    list = _bridge_iterator(AsyncJobs.list)
    logs = _bridge_iterator(AsyncJobs.logs)
    events = _bridge_iterator(AsyncJobs.events)
    wait = bridge(AsyncJobs.wait)
    cancel = bridge(AsyncJobs.cancel)
    retry = bridge(AsyncJobs.retry)
    close = bridge(AsyncJobs.aclose)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Volume:
    """Your team's named volumes (sync API; `AsyncVolume` for asyncio).

    Volume.create("cache", size_mib=512)
    with Sandbox.create(volumes=["cache:/data"]) as sbx:
        sbx.commands.run("echo kept > /data/note")
    Volume.delete("cache")
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise InvalidRequest(
            "Volume has no instances: use Volume.create(name, size_mib=N), .get(name), "
            ".list() or .delete(name)"
        )

    create = staticmethod(bridge_factory(AsyncVolume.create, lambda info: info))
    get = staticmethod(bridge_factory(AsyncVolume.get, lambda info: info))
    list = staticmethod(bridge_factory(AsyncVolume.list, lambda infos: infos))
    delete = staticmethod(bridge_factory(AsyncVolume.delete, lambda none: none))


def _same(value: R) -> R:
    return value


class Vm:
    """Your team's vms (sync API; `AsyncVm` for asyncio).

    Vm.create("py", language="python", persist=True)      # waits for its template
    print(Vm.run("py", "python3 main.py", files=["main.py"]).stdout)   # run in /in
    Vm.stop("py"); Vm.delete("py", keep_persist=True)
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise InvalidRequest(
            "Vm has no instances: use Vm.create(name, language=...), .get, .list, .start, "
            ".stop, .delete, .run or .hello"
        )

    create = staticmethod(bridge_factory(AsyncVm.create, _same))
    get = staticmethod(bridge_factory(AsyncVm.get, _same))
    list = staticmethod(bridge_factory(AsyncVm.list, _same))
    start = staticmethod(bridge_factory(AsyncVm.start, _same))
    stop = staticmethod(bridge_factory(AsyncVm.stop, _same))
    delete = staticmethod(bridge_factory(AsyncVm.delete, _same))
    run = staticmethod(bridge_factory(AsyncVm.run, _same))
    hello = staticmethod(bridge_factory(AsyncVm.hello, _same))
    download = staticmethod(bridge_factory(AsyncVm.download, _same))


class Template(TemplateBuilder):
    """A template to build, with E2B's builder vocabulary, and your team's templates
    (sync API; `AsyncTemplate` for asyncio):

        template = Template().from_template("debian").pip_install(["numpy"])
        info = Template.build(template, "numpy", on_build_logs=print)
        Template.list(); Template.get("numpy"); Template.delete("numpy")
    """

    build = staticmethod(bridge_factory(AsyncTemplate.build, _same))
    build_in_background = staticmethod(bridge_factory(AsyncTemplate.build_in_background, _same))
    get = staticmethod(bridge_factory(AsyncTemplate.get, _same))
    list = staticmethod(bridge_factory(AsyncTemplate.list, _same))
    delete = staticmethod(bridge_factory(AsyncTemplate.delete, _same))
    cancel = staticmethod(bridge_factory(AsyncTemplate.cancel, _same))

    @staticmethod
    def logs(name: str, **options: Any) -> Iterator[BuildLog]:
        """The build's logs and events (`AsyncTemplate.logs`)."""
        return _iterate(AsyncTemplate.logs(name, **options))

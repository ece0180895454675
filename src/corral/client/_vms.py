"""`AsyncVm`: your team's vms (`corral vm`, the Agent/krunvm seed) on a Corral server.

    info = await AsyncVm.create("py", language="python", persist=True)   # waits for its
    result = await AsyncVm.run("py", "python3 /in/main.py", files=["main.py"])  # template
    await AsyncVm.stop("py")                 # /persist stays; the rest of its disk goes
    await AsyncVm.delete("py")               # and its /persist volume (keep_persist=True)

A vm is a definition the server keeps; its sandbox is an ordinary one of your team, so
`run` is VmService.Start then SandboxService's files and commands on `sandbox_id`: any
client can do the same. The server and API key come from the arguments, else
`CORRAL_SERVER` and `CORRAL_API_KEY`, else the CLI's current context.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from corral.client._commands import OutputCallback, RunOptions
from corral.client._config import ClientSettings
from corral.client._connection import Connection, call_once
from corral.client._models import CommandResult, VmInfo
from corral.client._sandbox import AsyncSandbox
from corral.client._templates import AsyncTemplate, BuildLogCallback
from corral.errors import BuildFailed, InvalidRequest
from corral.images.languages import language_base
from corral.v1 import vms_pb2 as pb
from corral.vms import IN_DIR, OUT_DIR, VmSpec, check_vm_name

R = TypeVar("R")


async def _call(
    method: Callable[[Connection], Callable[..., Awaitable[R]]],
    request: object,
    connect: dict[str, Any],
) -> R:
    return await call_once(method, request, ClientSettings.resolve(**connect))


def _connect(
    server: str | None,
    api_key: str | None,
    context: str | None,
    ca_file: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    return {"server": server, "api_key": api_key, "context": context, "ca_file": ca_file}


class AsyncVm:
    """Your team's vms: named sandbox definitions of a language (python, javascript,
    ruby, go) with cpu, memory, network and an optional /persist volume."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise InvalidRequest(
            "AsyncVm has no instances: use `await AsyncVm.create(name, language=...)`, "
            ".get, .list, .start, .stop, .delete, .run or .hello"
        )

    @staticmethod
    async def create(
        name: str,
        *,
        language: str,
        cpu: float = 1.0,
        memory_mib: int = 512,
        network: str = "none",
        persist: bool = False,
        persist_mib: int = 1024,
        isolation: str = "auto",
        wait: bool = True,
        on_build_logs: BuildLogCallback | None = None,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> VmInfo:
        """Create a vm (not started). When your team has no template of its language
        yet, the server builds it (`lang-<language>`); with `wait` this waits for that
        build, handing its logs to `on_build_logs`, and raises BuildFailed if it failed.
        `isolation` is the tier of its sandboxes (auto: the server's default); a tier the
        server lacks, or one that cannot give its network or /persist, is refused
        (IsolationUnavailable, saying what to install) and nothing is made."""
        spec = VmSpec(name, language, cpu, memory_mib, network, persist, persist_mib, isolation)
        request = pb.CreateVmRequest(
            name=spec.name,
            language=spec.language,
            cpu=spec.cpu,
            memory_mib=spec.memory_mib,
            network=spec.network,
            persist=spec.persist,
            persist_mib=spec.persist_mib,
            isolation=spec.isolation,
        )
        connect = _connect(server, api_key, context, ca_file)
        reply = await _call(lambda c: c.vms.create, request, connect)
        info = VmInfo.from_proto(reply.vm)
        if wait and info.state == "building":
            async for entry in AsyncTemplate.logs(info.template, follow=True, **connect):
                if on_build_logs is not None:
                    result = on_build_logs(entry)
                    if result is not None:
                        await result
            info = await AsyncVm.get(name, **connect)
        if wait and info.state == "failed":
            raise BuildFailed(
                f"vm {name}: its template {info.template} did not build: {info.error} "
                f"(corral template logs {info.template})"
            )
        return info

    @staticmethod
    async def get(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> VmInfo:
        """The vm `name` of your team (UnknownVm if it has none)."""
        request = pb.GetVmRequest(name=check_vm_name(name))
        reply = await _call(
            lambda c: c.vms.get, request, _connect(server, api_key, context, ca_file)
        )
        return VmInfo.from_proto(reply.vm)

    @staticmethod
    async def list(
        *,
        all: bool = False,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> builtins.list[VmInfo]:
        """Your team's running vms by name; with `all`, the stopped ones too."""
        request = pb.ListVmsRequest(all=all)
        reply = await _call(
            lambda c: c.vms.list, request, _connect(server, api_key, context, ca_file)
        )
        return [VmInfo.from_proto(vm) for vm in reply.vms]

    @staticmethod
    async def start(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> VmInfo:
        """Run the vm's sandbox (a running vm is returned as it is)."""
        request = pb.StartVmRequest(name=check_vm_name(name))
        reply = await _call(
            lambda c: c.vms.start, request, _connect(server, api_key, context, ca_file)
        )
        return VmInfo.from_proto(reply.vm)

    @staticmethod
    async def stop(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> VmInfo:
        """Kill the vm's sandbox; /persist stays, the rest of what it wrote goes."""
        request = pb.StopVmRequest(name=check_vm_name(name))
        reply = await _call(
            lambda c: c.vms.stop, request, _connect(server, api_key, context, ca_file)
        )
        return VmInfo.from_proto(reply.vm)

    @staticmethod
    async def delete(
        name: str,
        *,
        keep_persist: bool = False,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """Stop the vm and forget it, with its /persist volume unless `keep_persist`
        (a vm created again by that name with persist=True gets it back)."""
        request = pb.DeleteVmRequest(name=check_vm_name(name), keep_persist=keep_persist)
        await _call(lambda c: c.vms.delete, request, _connect(server, api_key, context, ca_file))

    @staticmethod
    async def run(
        name: str,
        command: str | Sequence[str],
        *,
        files: Sequence[str | os.PathLike[str]] = (),
        out_dir: str | os.PathLike[str] | None = None,
        cwd: str = IN_DIR,
        timeout: float | None = 60,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        raw_output: bool = False,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> CommandResult:
        """Run `command` in the vm (started if it is stopped) from `cwd`: the local
        `files` are uploaded to /in first, and with `out_dir` the files the vm has in
        /out afterwards are downloaded there. `timeout` in seconds (None: none).
        Returns how the command ended."""
        paths = [Path(f) for f in files]
        for path in paths:
            if not path.is_file():
                raise InvalidRequest(f"--file {path}: no such local file")
        connect = _connect(server, api_key, context, ca_file)
        info = await AsyncVm.start(name, **connect)
        assert info.sandbox_id is not None
        box = await AsyncSandbox.connect(info.sandbox_id, **connect)
        try:
            for path in paths:
                await box.files.write(f"{IN_DIR}/{path.name}", path.read_bytes())
            options: RunOptions = {"cwd": cwd, "timeout": timeout, "raw_output": raw_output}
            if on_stdout is not None:
                options["on_stdout"] = on_stdout
            if on_stderr is not None:
                options["on_stderr"] = on_stderr
            result = await box.commands.run(command, **options)
            if out_dir is not None:
                await _download(box, Path(out_dir))
            return result
        finally:
            await box.aclose()

    @staticmethod
    async def hello(
        name: str,
        *,
        timeout: float | None = 120,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> CommandResult:
        """Run the vm's language's hello world (it prints `hello`; Go's builds it first,
        hence the longer `timeout`)."""
        info = await AsyncVm.get(
            name, server=server, api_key=api_key, context=context, ca_file=ca_file
        )
        command = language_base(info.language).hello
        connect = _connect(server, api_key, context, ca_file)
        return await AsyncVm.run(name, command, cwd="/tmp", timeout=timeout, **connect)

    @staticmethod
    async def download(
        name: str,
        out_dir: str | os.PathLike[str],
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> builtins.list[Path]:
        """Download the files the running vm has in /out into `out_dir`; the paths
        written."""
        connect = _connect(server, api_key, context, ca_file)
        info = await AsyncVm.get(name, **connect)
        if info.sandbox_id is None:
            raise InvalidRequest(f"vm {name} is {info.state}: its /out went with its sandbox")
        box = await AsyncSandbox.connect(info.sandbox_id, **connect)
        try:
            return await _download(box, Path(out_dir))
        finally:
            await box.aclose()


async def _download(box: AsyncSandbox, out_dir: Path) -> builtins.list[Path]:
    """The regular files under the vm's /out, written under `out_dir` at the same
    relative paths (symlinks and other entries are skipped; no path leaves `out_dir`)."""
    written: builtins.list[Path] = []
    for entry in await box.files.list(OUT_DIR, depth=8):
        if entry.type != "file":
            continue
        relative = PurePosixPath(entry.path).relative_to(OUT_DIR)
        if any(part in ("", ".", "..") for part in relative.parts):
            continue
        target = out_dir.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(await box.files.read_bytes(entry.path))
        written.append(target)
    return written

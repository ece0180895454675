"""An engine driven over stdin/stdout, for running sandboxes inside the fake internet.

The network tests start this module in the fake internet's gateway namespace
(`Internet.exec_argv(GATEWAY, ...)`) so that sandbox uplinks hang off the gateway, whose
only routes lead into the fake internet; the test process stays outside and sends one
JSON request a line, getting one JSON answer a line:

    {"op": "create", "network": "allowlist", "allow": ["192.0.2.0/24:80"], "limits": {...},
     "isolation": "gvisor"}      (a tier without the `host` template: the Debian base)
    {"op": "run", "id": ..., "argv": [...], "timeout": 30, "user": None}
                                                               -> exit_code, stdout, stderr
    {"op": "set_network", "id": ..., "network": ..., "allow": [...]}
    {"op": "footprint", "id": ...}                             -> the sandbox's host record
    {"op": "spawn", "id": ..., "argv": [...], "key": "k"}  then  {"op": "collect", "key": "k"}
    {"op": "destroy", "id": ...}
    {"op": "events", "id": ...}                                -> its network events
    {"op": "port", "id": ..., "port": 8000, "send": "ping"}    -> the answer, through
                                                        `Sandbox.open_port` (the port proxy's way)

An error comes back as {"error": class name, "message": ...}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from corral.config import Settings
from corral.errors import CorralError
from corral.isolation import Command, Engine, Sandbox, registry
from corral.limits import Limits
from corral.network.policy import NetworkPolicy
from tests.kit import internet


async def serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sandboxes: dict[str, Sandbox] = {}
    async with Engine(settings) as engine:
        print(json.dumps({"ready": True}), flush=True)
        while line := await reader.readline():
            request = json.loads(line)
            try:
                answer = await handle(engine, sandboxes, request)
            except CorralError as exc:
                answer = {"error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(answer), flush=True)
            if request["op"] == "exit":
                break


spawned: dict[str, Command] = {}


async def handle(engine: Engine, sandboxes: dict[str, Sandbox], request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "create":
        isolation = request.get("isolation")
        template = "host" if engine.backend(isolation).host_template else _debian(engine)
        sandbox = await engine.create(
            template,
            network=NetworkPolicy.parse(request.get("network", "none"), request.get("allow", [])),
            limits=Limits(**request.get("limits", {})),
            isolation=isolation,
        )
        sandboxes[sandbox.id] = sandbox
        return {"id": sandbox.id}
    if op == "exit":
        return {}
    if op == "unavailable":  # why this process cannot run the tier (its user, its host)
        name = request["tier"]
        if reason := registry.unavailable(name, engine.settings):
            return {"reason": reason}
        modes = engine.backend(name).network_modes()
        return {
            "reason": None if len(modes) > 1 else f"it enforces network {', '.join(modes)} only"
        }
    if op == "collect":
        result = await spawned.pop(request["key"]).collect()
        return {
            "exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace"),
        }
    sandbox = sandboxes[request["id"]]
    if op == "run":
        result = await sandbox.run(
            request["argv"], user=request.get("user"), timeout=request.get("timeout", 60)
        )
        return {
            "exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace"),
        }
    if op == "footprint":
        record = dataclasses.asdict(sandbox.footprint)
        record["path"] = str(record["path"])
        return record
    if op == "spawn":  # started now, its result read later with "collect"
        spawned[request["key"]] = await sandbox.exec(request["argv"], timeout=60)
        return {}
    if op == "port":
        sock = await sandbox.open_port(request["port"])
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(request["send"].encode())
            writer.write_eof()
            return {"reply": (await asyncio.wait_for(reader.read(), 20)).decode()}
        finally:
            writer.close()
    if op == "checkpoint":  # into a fresh directory of the runtime dir, kept by the caller
        image = Path(tempfile.mkdtemp(dir=engine.settings.runtime_dir)) / "image"
        await sandbox.checkpoint(image)
        return {"image": str(image)}
    if op == "set_network":
        policy = NetworkPolicy.parse(request["network"], request.get("allow", []))
        await sandbox.set_network(policy)
        return {}
    if op == "allow":
        rule = next(r for r in sandbox.spec.network.allow if r.text == request["rule"])
        await sandbox.allow(rule, request["addresses"], request.get("ttl", 60))
        return {}
    if op == "destroy":
        await sandbox.destroy()
        return {}
    if op == "events":  # what the sandbox recorded so far (after a destroy too)
        return [dataclasses.asdict(e) for e in sandbox.network_events.take()]
    raise ValueError(f"unknown op {op!r}")


def _debian(engine: Engine) -> str:
    """The template `debian` (the cached Debian base with python3, tests/kit/debian.py),
    added to `engine` once."""
    from corral.images import LayerStore
    from tests.kit.debian import base_layer

    if "debian" not in engine.templates.names():
        store = LayerStore(engine.settings.data_dir / "templates")
        engine.templates.add("debian", store, [base_layer(store, ["python3"]).digest])
    return "debian"


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    asyncio.run(
        serve(
            Settings(
                runtime_dir=Path(config["runtime_dir"]),
                data_dir=Path(config["data_dir"]),
                cgroup_parent=config["cgroup_parent"],
                network_dns=config.get("network_dns", ""),
                guest_kernel_dir=config.get("guest_kernel_dir", ""),
            )
        )
    )


class Driver:
    """The test side: a driver process in the gateway, and calls to it."""

    def __init__(self, argv: list[str]) -> None:
        from tests.kit import processes

        self.process = processes.spawn(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_ROOT
        )
        ready = self._read()
        assert ready == {"ready": True}, ready

    @classmethod
    def in_gateway(cls, gateway_netns: str, settings: Settings) -> Driver:
        """A driver in the fake internet's gateway: its sandboxes' uplinks hang off it.
        Joined with nsenter, not `ip netns exec`, which would remount /sys (cgroups)."""
        config = {
            "runtime_dir": str(settings.runtime_dir),
            "data_dir": str(settings.data_dir),
            "cgroup_parent": settings.cgroup_parent,
            # The fake internet's DNS: never the host's, which the gateway cannot reach.
            "network_dns": f"{internet.DNS_V4},{internet.DNS_V6}",
            "guest_kernel_dir": settings.guest_kernel_dir,
        }
        argv = [
            "nsenter", f"--net=/run/netns/{gateway_netns}", "--",
            sys.executable, "-m", "tests.kit.netdriver", json.dumps(config),
        ]  # fmt: skip
        return cls(argv)

    def _read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the driver exited ({self.process.poll()})"
        return json.loads(line)

    def call(self, **request: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def ok(self, **request: Any) -> Any:
        answer = self.call(**request)
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        from tests.kit import processes

        if self.process.poll() is None:
            self.call(op="exit")
        processes.stop(self.process)


_ROOT = str(Path(__file__).resolve().parents[2])

"""The `process` tier: the guest agent runs directly on the host, with NO isolation.

For development and for testing the layers above the engine on machines without
namespaces. It must be asked for by name and enabled with CORRAL_ALLOW_PROCESS_BACKEND=1;
`auto` never picks it. Cgroup limits still apply when the host offers cgroups.
"""

from __future__ import annotations

import os

from corral.config import Settings
from corral.isolation.agent_install import agent_command, install_agent
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.footprint import Footprint


class ProcessBackend(Backend):
    name = "process"

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing = []
        if not settings.allow_process_backend:
            missing.append(
                "the process backend runs code without isolation; "
                "enable it for development with CORRAL_ALLOW_PROCESS_BACKEND=1"
            )
        if not os.access(settings.guest_python, os.X_OK):
            missing.append(f"{settings.guest_python} for the guest agent: apt-get install python3")
        return Capabilities(
            cls.name, not missing, tuple(missing), {"platform": "host", "isolation": "none"}
        )

    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        assert entrypoint is None, "the process tier starts no entrypoints"
        dirs = {name: footprint.path / name for name in ("workspace", "home", "tmp")}
        for path in dirs.values():
            path.mkdir(mode=0o700)
        workdir = str(dirs["workspace"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(dirs["home"]),
            "TMPDIR": str(dirs["tmp"]),
            "LANG": "C.UTF-8",
            **spec.env,
        }
        agent_dir = install_agent(self.settings.runtime_dir, self.settings.guest_python)
        argv = agent_command(str(agent_dir), self.settings.guest_python, workdir)
        return LaunchPlan(argv=argv, env=env, workdir=workdir, host_cwd=workdir)

"""A template's start command and ready check, run as each of its sandboxes starts.

E2B's `set_start_cmd(cmd, ready_cmd)` and a Dockerfile's CMD (with HEALTHCHECK as the
ready check): the start command runs in the background (listed with the tag `start`, as
the template's user, in its working directory) and the sandbox is handed out once the
ready check exits 0 — a Jupyter server or a web app is up when `create` returns. A ready
check that does not pass within READY_TIMEOUT fails the creation with its output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from corral.errors import SandboxStartFailed
from corral.isolation import Sandbox

READY_TIMEOUT = 60.0
_RETRY = 0.2


async def start_template_command(sandbox: Sandbox, env: Mapping[str, str]) -> None:
    """Start `sandbox`'s template's start command and wait for its ready check (nothing
    for a template without them)."""
    rootfs = sandbox.spec.rootfs
    if rootfs is None:
        return
    if rootfs.start:
        process = await sandbox.exec(
            ["/bin/sh", "-c", rootfs.start], env=dict(env), background=True, tag="start"
        )
        await process.detach()
    if not rootfs.ready:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = max(deadline - time.monotonic(), _RETRY)
        ran = await sandbox.run(["/bin/sh", "-c", rootfs.ready], env=dict(env), timeout=left)
        if ran.exit_code == 0:
            return
        if time.monotonic() + _RETRY >= deadline:
            tail = (ran.stderr or ran.stdout).decode(errors="replace").strip()[-400:]
            raise SandboxStartFailed(
                f"the template's ready check ({rootfs.ready}) did not pass within "
                f"{READY_TIMEOUT:g} s of its start command ({rootfs.start or 'none'}): "
                f"{tail or f'exit code {ran.exit_code}'}"
            )
        await asyncio.sleep(_RETRY)

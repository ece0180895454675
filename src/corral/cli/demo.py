"""`corral server --demo` (what `make run` runs): once the server answers, a first command
in a sandbox through the API, as any client would make it, and what to try next.

A client like the rest of the CLI: the server runs it beside itself (`serve`'s
`companion`) and knows nothing of it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

from corral.client import AsyncSandbox
from corral.client._tls import ssl_context
from corral.errors import CorralError

_COMMAND = 'echo "hello from $(hostname) as $(id -un), pid $$"; uname -sr'


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _wait_healthy(url: str, ca_file: str | None) -> None:
    # Until it answers; if the server never does, it stops and cancels this wait.
    async with httpx.AsyncClient(timeout=2, verify=ssl_context(ca_file)) as http:
        while True:
            try:
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)


async def show(key_file: Path, ca_file: str | None, url: str) -> None:
    """Wait for the server at `url`, run a first command there with the default team's
    API key (which the server writes to `key_file` as it starts), say what to try next.

    `ca_file` verifies an https server (the SDK reads it as CORRAL_CA_FILE)."""
    await _wait_healthy(url, ca_file)
    api_key = key_file.read_text().strip()
    _say(f"corral server is up at {url} (Ctrl-C stops it)")
    _say(f"the default team's API key is in {key_file}")
    _say(f"running a first command in a sandbox through the API:  sh -c '{_COMMAND}'")
    started = time.perf_counter()
    try:
        async with await AsyncSandbox.create(server=url, api_key=api_key) as sbx:
            result = await sbx.commands.run(
                _COMMAND, on_stdout=lambda text: _say(text.rstrip("\n")), timeout=30
            )
            elapsed = (time.perf_counter() - started) * 1000
            _say(
                f"exit code {result.exit_code} ({result.reason}) in sandbox {sbx.sandbox_id}, "
                f"{sbx.info.isolation} isolation, {elapsed:.0f} ms from create to result"
            )
    except CorralError as exc:
        _say(f"the first command failed: {exc}")
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    _say()
    _say("next, in another terminal (this server keeps running):")
    if url.startswith("https:"):
        trust = f" CORRAL_CA_FILE={ca_file}" if ca_file else ""
        _say(f"  export CORRAL_SERVER={url}{trust}")
    _say("  uv run corral run -- python3 -c 'print(6 * 7)'")
    _say("  uv run corral sandbox create      then   uv run corral sandbox exec ID -- ls -la")
    _say("  uv run corral sandbox list --output json")
    _say(
        f"  curl -H 'Content-Type: application/json' "
        f'-H "Authorization: Bearer $(cat {key_file})" '
        f"-d '{{}}' {f'--cacert {ca_file} ' if ca_file else ''}"
        f"{url}/corral.v1.SandboxService/List"
    )
    _say("  uv run python -c 'from corral import Sandbox; print(Sandbox.list())'")

"""Terminal benchmark: a command's round trip on a pty beside one on pipes, and a
keystroke's echo through a terminal in a sandbox, beside a local pty's.

    uv run python benchmarks/terminals.py --json

Prints one JSON object. Every figure is measured in this run on this machine, in
milliseconds: `exec_pipes` and `exec_pty` run `true` in one warm namespace sandbox
(engine, no server) to its end; `echo_sandbox` writes one byte to `cat` on a sandbox's
terminal and waits for the terminal's echo; `echo_local` does the same on a pty of this
host with no sandbox, agent or engine between (the raw baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import print_report

from corral.config import Settings
from corral.isolation import Engine, Sandbox
from corral.terminal import PtySize

SIZE = PtySize(80, 24)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 3),
        "n": len(ordered),
    }


async def exec_round_trips(sandbox: Sandbox, count: int, pty: PtySize | None) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        result = await (await sandbox.exec(["true"], pty=pty)).wait()
        samples.append((time.perf_counter() - start) * 1000)
        assert result.exit_code == 0, result
    return samples


async def echo_in_sandbox(sandbox: Sandbox, count: int) -> list[float]:
    command = await sandbox.exec(["cat"], pty=SIZE)
    chunks = aiter(command)
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            await command.write_stdin(b"x")
            chunk = await anext(chunks)
            samples.append((time.perf_counter() - start) * 1000)
            assert chunk.data == b"x", chunk
    finally:
        await command.kill()
    return samples


def echo_local(count: int) -> list[float]:
    master, slave = os.openpty()
    cat = subprocess.Popen(["cat"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(master, b"x")
            select.select([master], [], [])
            assert os.read(master, 16) == b"x"
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        cat.kill()
        cat.wait()
        os.close(master)
    return samples


async def measure(count: int) -> dict[str, object]:
    runtime = Path(tempfile.mkdtemp(prefix="corral-bench-pty-"))
    settings = Settings(data_dir=runtime / "data", runtime_dir=runtime)
    engine = Engine(settings)
    try:
        sandbox = await engine.create(isolation="namespace")
        try:
            await exec_round_trips(sandbox, 5, None)  # warm
            return {
                "exec_pipes": summary(await exec_round_trips(sandbox, count, None)),
                "exec_pty": summary(await exec_round_trips(sandbox, count, SIZE)),
                "echo_sandbox": summary(await echo_in_sandbox(sandbox, count)),
                "echo_local": summary(echo_local(count)),
                "load_1m": os.getloadavg()[0],
            }
        finally:
            await sandbox.destroy()
    finally:
        await engine.aclose()
        shutil.rmtree(runtime, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    args = parser.parse_args()
    print_report(asyncio.run(measure(args.count)), args.json)


if __name__ == "__main__":
    main()

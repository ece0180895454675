"""Layer templates: create → first output of a sandbox of the Debian base vs `host`, idle
cost, and a template build fresh vs rebuilt from the step cache.

    uv run python benchmarks/templates.py --json      # as root, after `make setup`

Bootstraps a Debian base (apt + python3) offline from the local archive (.cache/debian, or
CORRAL_TEST_DEBIAN_ARCHIVE) inside `unshare --net`, imports it as one layer, registers it
as a template, then times, alternating the two so the load hits both alike, the create
call to the result of `true` in the new sandbox for `host` and for the layer template
(its disk: a spare sparse ext4 mounted ahead, its layer idmapped with the sandbox's id
range, the template's accounts layer after the first, its overlay). Issue 13's target:
the ratio ≤ 1.2. Also the idle memory of a layer-template sandbox and the load average.

The layer template's agent is self-contained (the host's Python through the host's loader,
from /.corral: `corral.isolation.agent_install.GuestRuntime`); the third column,
`debian_template_python`, runs it the way it ran before, with the template's own
/usr/bin/python3 (this script swaps the runtime for that column only), and
`guest_runtime_check_ms` is the one-time check of the host's interpreter per process.

Builds: a recipe of BUILD_STEPS RUN steps on that base, built as a `build` job (a real
queue, worker and SQLite store) from `TemplateCatalog.build` to the job's end: fresh (its
first step changed each time, so no step is cached) then again unchanged (every step from
the cache), alternating; medians of a few.

The data-science template (issue 13's "done means"), when the archive has python3-numpy
and python3-pandas (scripts/debian_archive.sh lists them): a Debian base with both, timed
in the same alternation from the create call to the result of `true` and to the output of
`python3 -c "import pandas"` (numpy and pandas loaded: the first useful output), and the
idle memory of such a sandbox.

The machine's load moves the ratio by ±0.15 from run to run: compare medians of runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import idle_cost, percentiles, run_cli

from corral.config import Settings
from corral.images import Layer, LayerStore, parse_recipe
from corral.images.debian import bootstrap
from corral.isolation import Engine, agent_install, namespace
from corral.isolation.agent_install import GuestRuntime
from corral.jobs.runtime import JobRuntime
from corral.store import Store
from corral.templates import BuildRequest

BUILD_STEPS = (
    "echo {token} > /token",
    'python3 -c \'import json; json.dump(list(range(1000)), open("/numbers.json", "w"))\'',
    "mkdir -p /srv/app && seq 1 2000 > /srv/app/lines",
    "head -c 4000000 /dev/zero > /srv/app/blob",
)

ARCHIVE = Path(
    os.environ.get("CORRAL_TEST_DEBIAN_ARCHIVE")
    or Path(__file__).resolve().parent.parent / ".cache" / "debian"
)
DATA_SCIENCE = ("python3", "python3-numpy", "python3-pandas")
IMPORT_PANDAS = ["python3", "-c", "import pandas; print(pandas.__version__)"]


def archive_has(packages: tuple[str, ...]) -> bool:
    listed = (ARCHIVE / "Packages").read_text().splitlines()
    have = {line.split(":", 1)[1].strip() for line in listed if line.startswith("Package:")}
    return set(packages) <= have


def suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{ARCHIVE}/Release names no codename")


# The agent as it ran before it was self-contained: the template's own Python.
TEMPLATE_PYTHON = GuestRuntime("/usr/bin/python3", None, (), ("/usr/bin/python3",))


async def first_output(
    engine: Engine, template: str, template_python: bool = False, argv: tuple[str, ...] = ("true",)
) -> float:
    if template_python:
        namespace.guest_runtime = lambda python: TEMPLATE_PYTHON  # type: ignore[attr-defined,assignment]
    try:
        start = time.perf_counter()
        sandbox = await engine.create(template=template, isolation="namespace")
    finally:
        namespace.guest_runtime = agent_install.guest_runtime  # type: ignore[attr-defined]
    result = await sandbox.run(list(argv))
    elapsed = (time.perf_counter() - start) * 1000
    assert result.ok, result
    await sandbox.destroy()
    return elapsed


async def main(quick: bool) -> dict[str, Any]:
    if os.geteuid() != 0 or not (ARCHIVE / "Release").is_file():
        raise SystemExit("run as root after `make setup` (it makes the local Debian archive)")
    scratch = Path(tempfile.mkdtemp(prefix="corral-templates-"))
    scratch.chmod(0o711)  # the sandboxes' uids traverse it to their files
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    try:
        rootfs = scratch / "rootfs"
        mirror = f"deb [trusted=yes] copy://{ARCHIVE} ./"
        bootstrap(suite(), rootfs, mirror=mirror, include=["python3"])
        store = LayerStore(scratch / "data" / "templates")
        layer = store.import_dir(rootfs)
        shutil.rmtree(rootfs)
        ds_layer: Layer | None = None
        if archive_has(DATA_SCIENCE):
            bootstrap(suite(), rootfs, mirror=mirror, include=DATA_SCIENCE)
            ds_layer = store.import_dir(rootfs)
            shutil.rmtree(rootfs)
        settings = Settings(
            data_dir=scratch / "data", runtime_dir=scratch / "run", cgroup_parent="corral-bench"
        )
        runs = 10 if quick else 40
        start = time.perf_counter()
        agent_install.guest_runtime(settings.guest_python)
        check_ms = (time.perf_counter() - start) * 1000
        async with Engine(settings) as engine:
            engine.templates.add("debian", store, [layer.digest])
            if ds_layer is not None:
                engine.templates.add("data-science", store, [ds_layer.digest])
            ds_true: list[float] = []
            ds_pandas: list[float] = []
            host: list[float] = []
            debian: list[float] = []
            own_python: list[float] = []
            for name, own in (("host", False), ("debian", False), ("debian", True)):
                await first_output(engine, name, own)  # warm caches (agent install, probes)
            if ds_layer is not None:  # and pandas' files in the page cache
                await first_output(engine, "data-science", argv=tuple(IMPORT_PANDAS))
            for _ in range(runs):
                host.append(await first_output(engine, "host"))
                debian.append(await first_output(engine, "debian"))
                own_python.append(await first_output(engine, "debian", template_python=True))
                if ds_layer is not None:
                    ds_true.append(await first_output(engine, "data-science"))
                    ds_pandas.append(
                        await first_output(engine, "data-science", argv=tuple(IMPORT_PANDAS))
                    )
            sandbox = await engine.create(template="debian", isolation="namespace")
            await sandbox.run(["true"])
            await asyncio.sleep(0.5)
            idle = idle_cost(sandbox)
            await sandbox.destroy()
            data_science: dict[str, Any] = {"data_science": "the archive lacks numpy/pandas"}
            if ds_layer is not None:
                sandbox = await engine.create(template="data-science", isolation="namespace")
                await sandbox.run(["true"])
                await asyncio.sleep(0.5)
                ds_idle = idle_cost(sandbox)
                await sandbox.destroy()
                data_science = {
                    "create_to_first_output_data_science_ms": {
                        **percentiles(ds_true, 50, 90),
                        "n": runs,
                    },
                    "create_to_import_pandas_ms": {**percentiles(ds_pandas, 50, 90), "n": runs},
                    "data_science_vs_host_ratio": round(
                        statistics.median(ds_true) / statistics.median(host), 2
                    ),
                    "data_science_layer_bytes": ds_layer.size_bytes,
                    **{f"data_science_{k}": v for k, v in ds_idle.items()},
                }
            builds = await build_times(settings, engine, layer, 3 if quick else 5)
        ratio = statistics.median(debian) / statistics.median(host)
        report.update(
            {
                "create_to_first_output_host_ms": {**percentiles(host, 50, 90), "n": runs},
                "create_to_first_output_debian_ms": {**percentiles(debian, 50, 90), "n": runs},
                "create_to_first_output_debian_template_python_ms": {
                    **percentiles(own_python, 50, 90),
                    "n": runs,
                },
                "debian_vs_host_ratio": round(ratio, 2),
                "self_contained_vs_template_python_ratio": round(
                    statistics.median(debian) / statistics.median(own_python), 2
                ),
                "guest_runtime_check_ms": round(check_ms, 1),
                "target_ratio": 1.2,
                "layer_bytes": layer.size_bytes,
                **idle,
                **data_science,
                **builds,
                "load_1min_after": os.getloadavg()[0],
            }
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _recipe(token: str) -> str:
    steps = "".join(f"  - run: {json.dumps(step.format(token=token))}\n" for step in BUILD_STEPS)
    return f"template: debian\nsteps:\n{steps}"


async def build_times(settings: Settings, engine: Engine, base: Layer, runs: int) -> dict[str, Any]:
    """Seconds from `build` to the build job's end: fresh, then the same recipe again."""
    store = Store.open(settings)
    runtime = JobRuntime(settings.with_(job_pool=0), store, engine, workers=1)
    fresh: list[float] = []
    cached: list[float] = []
    try:
        await runtime.start()
        team = store.create_team("bench")
        runtime.templates.add_layers(team.id, "debian", [base.digest], source="debian")

        async def build(recipe: str) -> tuple[float, int]:
            start = time.perf_counter()
            request = BuildRequest("bench", parse_recipe(recipe), "recipe")
            record = await runtime.templates.build(team.id, request)
            assert record.build_job_id is not None
            job = await runtime.queue.wait_final(record.build_job_id, 600)
            elapsed = time.perf_counter() - start
            done = await runtime.templates.get(team.id, "bench")
            assert job.state == "succeeded" and done.state == "ready", (
                job.state_reason,
                done.error,
            )
            return elapsed, done.steps_cached

        for i in range(runs):
            recipe = _recipe(f"run-{i}-{time.time_ns()}")
            seconds, hits = await build(recipe)
            assert hits == 0
            fresh.append(seconds)
            seconds, hits = await build(recipe)
            assert hits == len(BUILD_STEPS)
            cached.append(seconds)
    finally:
        await runtime.aclose()
        store.close()
    return {
        "build_steps": len(BUILD_STEPS),
        "build_fresh_s": {**percentiles(fresh, 50, 90), "n": runs},
        "build_cached_s": {**percentiles(cached, 50, 90), "n": runs},
        "build_cached_vs_fresh": round(statistics.median(cached) / statistics.median(fresh), 3),
    }


if __name__ == "__main__":
    run_cli(__doc__, main)

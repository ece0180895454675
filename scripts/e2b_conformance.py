#!/usr/bin/env python3
"""Run E2B's own Python SDK test suite against a Corral server and print how much passes.

    scripts/e2b_conformance.py PATH_TO_E2B_CHECKOUT [--json] [--area AREA ...]

PATH_TO_E2B_CHECKOUT is a checkout of github.com/e2b-dev/E2B at the SDK version that
tests/e2b_sdk pins (2.45.1); its `packages/python-sdk/tests/{sync,shared,async}` run, with
their own pytest.ini, in tests/e2b_sdk's environment (the pinned `e2b` from PyPI), never
copied here. As root (sandboxes need it), in a network namespace with loopback only.

Two passes. First with no server at all (E2B_API_URL pointing at a closed loopback port,
E2B_SANDBOX_URL unset as in a plain install): the tests that pass there never needed a
server (mocked volumes and secrets, payload builders, …); they are reported as "offline"
and not counted, nor are those the suite itself skips there (a platform, a missing
feature of the SDK). Then against a real Corral
server (tests/e2b_sdk/corral_server.py, the launcher the SDK tests use too): every other
test, but the cloud-only ones (wildcard DNS and public TLS hosts, egress to the internet,
builds from registry images: tests/e2b_sdk/e2b_conformance_plugin.py lists each with its
reason), which are deselected and named. The report: passed/counted per area, sync and
async, and every test that did not pass with a one-line reason, marked when it failed the
same way with no server at all (then it is the SDK's, not the server's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
E2B_ENV = ROOT / "tests" / "e2b_sdk"
sys.path.insert(0, str(E2B_ENV))

import corral_server  # noqa: E402  (stdlib-only modules of the E2B environment)
from e2b_conformance_plugin import (  # noqa: E402
    AREA_NAMES,
    CLOUD_ONLY,
    SIDES,
    area_of,
    side_of,
)

SUITES = ("tests/sync", "tests/shared", "tests/async")
# E2B's pytest.ini gives each test 30 s; this box is slower than their CI (2 shared cores).
DEFAULT_TIMEOUT = 60


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of e2b-dev/E2B (2.45.1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--area", action="append", choices=AREA_NAMES, help="only this area; repeatable"
    )
    parser.add_argument("-k", dest="keyword", help="only tests matching pytest's -k EXPR")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per test (s)")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers")
    parser.add_argument("--markdown", type=Path, help="also write the report there")
    args = parser.parse_args(argv)

    sdk = args.checkout.resolve() / "packages" / "python-sdk"
    if not (sdk / "tests" / "conftest.py").is_file():
        parser.error(f"{args.checkout} is not a checkout of e2b-dev/E2B (no {sdk}/tests)")
    if os.geteuid() != 0:
        parser.error("run as root: the server's sandboxes need it")

    corral_server.isolate_network()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="e2b-conformance-") as scratch:
        work = Path(scratch)
        # No E2B_SANDBOX_URL: a few unit tests check the SDK's default envd routing (with
        # E2B_DOMAIN=localhost, what is not mocked goes to loopback and is refused).
        offline_env = {
            "E2B_API_URL": f"http://127.0.0.1:{corral_server.free_port()}",  # nothing there
            "E2B_API_KEY": "e2b_" + "0" * 40,
            "E2B_DOMAIN": "localhost",
            # A refused connection fails at once, not after three retries with backoff
            # (~2 s a test); no test of the suites run here reads this setting.
            "E2B_CONNECTION_RETRIES": "0",
        }
        say("pass 1: without a server (offline tests)", args.json)
        offline = run_suite(sdk, offline_env, work / "offline.json", args, skip=None)
        set_aside = sorted(n for n, r in offline.items() if r["outcome"] in ("passed", "skipped"))
        skip = work / "skip.json"
        skip.write_text(json.dumps(set_aside))
        say("pass 2: against a Corral server", args.json)
        with corral_server.running() as server:
            online = run_suite(sdk, server.e2b_env, work / "online.json", args, skip=skip)
    report = summarize(sdk, offline, online, args, time.monotonic() - started)
    text = render(report)
    if args.markdown:
        args.markdown.write_text(text)
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def say(message: str, quiet: bool) -> None:
    print(message, file=sys.stderr if quiet else sys.stdout, flush=True)


def run_suite(
    sdk: Path,
    e2b_env: Mapping[str, str],
    results: Path,
    args: argparse.Namespace,
    *,
    skip: Path | None,
) -> dict[str, dict[str, Any]]:
    """One pytest run of the checkout's suite in the E2B environment; its results."""
    uv = [shutil.which("uv") or sys.executable, *([] if shutil.which("uv") else ["-m", "uv"])]
    command = [
        *uv,
        "run",
        "--project",
        str(E2B_ENV),
        "--frozen",
        "pytest",
        "-p",
        "e2b_conformance_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        f"timeout={args.timeout}",
        "-q",
        "--no-header",
        "-rN",
        "--tb=no",
        *(["-n", str(args.workers)] if args.workers > 1 else []),
        *(["-k", args.keyword] if args.keyword else []),
        *SUITES,
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "CORRAL_"))},
        **e2b_env,
        "PYTHONPATH": str(E2B_ENV),
        "CORRAL_CONFORMANCE_RESULTS": str(results),
        "CORRAL_CONFORMANCE_AREAS": ",".join(args.area or ()),
        **({"CORRAL_CONFORMANCE_SKIP": str(skip)} if skip else {}),
    }
    env.pop("VIRTUAL_ENV", None)
    # pytest's own output is progress only (the report comes from the plugin's results).
    subprocess.run(command, cwd=sdk, env=env, stdout=sys.stderr if args.json else None)
    if not results.is_file():
        raise SystemExit(f"the suite's run wrote no results ({' '.join(command)})")
    tests: dict[str, dict[str, Any]] = json.loads(results.read_text())["tests"]
    return tests


def summarize(
    sdk: Path,
    offline: dict[str, dict[str, Any]],
    online: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    seconds: float,
) -> dict[str, Any]:
    areas: dict[str, dict[str, dict[str, int]]] = {}
    for nodeid, result in online.items():
        cell = areas.setdefault(area_of(nodeid), {}).setdefault(
            side_of(nodeid), {"passed": 0, "counted": 0}
        )
        cell["counted"] += 1
        cell["passed"] += result["outcome"] == "passed"
    totals = {
        side: {
            key: sum(sides.get(side, {}).get(key, 0) for sides in areas.values())
            for key in ("passed", "counted")
        }
        for side in SIDES
    }

    def count(outcome: str) -> dict[str, int]:
        return {
            side: sum(side_of(n) == side and r["outcome"] == outcome for n, r in offline.items())
            for side in SIDES
        }

    def same_offline(nodeid: str, result: dict[str, Any]) -> bool:
        before = offline.get(nodeid)
        return before is not None and before["reason"] == result["reason"]

    commit = subprocess.run(
        ["git", "-C", str(sdk), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "checkout": str(sdk.parents[1]),
        "commit": commit,
        "areas_run": args.area or "all",
        "timeout_seconds": args.timeout,
        "seconds": round(seconds),
        "areas": {name: areas[name] for name in (*AREA_NAMES, "other") if name in areas},
        "totals": totals,
        "offline": count("passed"),
        "skipped_by_the_suite": [
            {"nodeid": n, "reason": r["reason"]}
            for n, r in sorted(offline.items())
            if r["outcome"] == "skipped"
        ],
        "cloud_only": [
            {"nodeid": n, "reason": r}
            for n, r in sorted(CLOUD_ONLY.items())
            if not args.area or area_of(n) in args.area
        ],
        "not_passed": [
            {
                "nodeid": n,
                "area": area_of(n),
                "outcome": r["outcome"],
                "reason": r["reason"],
                "same_without_a_server": same_offline(n, r),
            }
            for n, r in sorted(online.items(), key=lambda item: (area_of(item[0]), item[0]))
            if r["outcome"] != "passed"
        ],
    }


def render(report: dict[str, Any]) -> str:
    def cell(sides: dict[str, dict[str, int]], side: str) -> str:
        found = sides.get(side)
        return f"{found['passed']}/{found['counted']}" if found else "-"

    def percent(total: dict[str, int]) -> str:
        share = 100 * total["passed"] / total["counted"] if total["counted"] else 0.0
        return f"{total['passed']}/{total['counted']} ({share:.0f}%)"

    lines = [
        "# E2B SDK conformance (E2B's own python-sdk tests against Corral)",
        "",
        f"Checkout {report['checkout']} at {report['commit'][:12]}; areas: "
        f"{report['areas_run']}; {report['timeout_seconds']:g} s per test; "
        f"run took {report['seconds']} s.",
        "",
        "| area | sync passed/counted | async passed/counted |",
        "|---|---|---|",
    ]
    for area, sides in report["areas"].items():
        lines.append(f"| {area} | {cell(sides, 'sync')} | {cell(sides, 'async')} |")
    totals = report["totals"]
    lines += [
        f"| **total** | **{percent(totals['sync'])}** | **{percent(totals['async'])}** |",
        "",
        f"Not counted: {report['offline']['sync']} sync and {report['offline']['async']} "
        "async tests pass with no server at all (offline unit tests, mocked volumes and "
        f"secrets); {len(report['skipped_by_the_suite'])} the suite skips by itself "
        f"(listed below); {len(report['cloud_only'])} cloud-only tests were deselected:",
        "",
    ]
    lines += [f"- `{c['nodeid']}`: {c['reason']}" for c in report["cloud_only"]]
    lines += ["", "Skipped by the suite itself:", ""]
    lines += [f"- `{t['nodeid']}`: {t['reason']}" for t in report["skipped_by_the_suite"]]
    lines += ["", f"## Not passed ({len(report['not_passed'])})", ""]
    lines += [
        f"- [{t['area']}] `{t['nodeid']}` {t['outcome']}: {t['reason']}"
        + (" (fails the same with no server: the SDK's)" if t["same_without_a_server"] else "")
        for t in report["not_passed"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

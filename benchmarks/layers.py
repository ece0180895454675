"""Template layers: what a Debian base costs to make and to start from (issue 13 groundwork).

    uv run python benchmarks/layers.py --json      # as root, after `make setup`

Bootstraps a base (apt + python3-minimal) offline from the local archive (.cache/debian)
inside `unshare --net`, imports it into a scratch LayerStore, re-digests it, then times
per-sandbox costs: an overlay mount+umount of the layer, a loop-mounted ext4 disk of
1 GiB (the planned bound of a sandbox's writes), and bubblewrap running
`python3 -c pass` from the host template's read-only binds versus from an overlay of the
layer (the mount included). Reports medians and the 1-minute load average around it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import print_report

from corral.images import LayerStore, mount_overlay, tree_digest, unmount_overlay

ARCHIVE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
BWRAP = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
BWRAP += ["--die-with-parent", "--uid", "1000", "--gid", "1000"]
TAIL = ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/usr/bin/python3", "-c", "pass"]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1], 3),
        "runs": len(ordered),
    }


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{ARCHIVE}/Release names no codename")


def bench(scratch: Path, runs: int) -> dict[str, Any]:
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    rootfs = scratch / "rootfs"
    mirror = f"deb [trusted=yes] copy://{ARCHIVE} ./"
    include = "--include=python3-minimal"
    report["bootstrap_s"] = round(
        timed(
            lambda: run(
                "unshare", "--net", "mmdebstrap", "--quiet", "--mode=root", "--variant=apt",
                include, suite(), str(rootfs), mirror,
            )
        ) / 1000,
        2,
    )  # fmt: skip
    store = LayerStore(scratch / "store")
    layers = []
    report["import_s"] = round(timed(lambda: layers.append(store.import_dir(rootfs))) / 1000, 2)
    layer = layers[0]
    report["layer"] = {"bytes": layer.size_bytes, "entries": layer.entries}
    report["neutralised"] = len(layer.neutralised)
    report["digest_s"] = round(timed(lambda: tree_digest(layer.path)) / 1000, 2)

    def sandbox_dirs(name: str) -> tuple[Path, Path, Path]:
        dirs = tuple(scratch / name / part for part in ("upper", "work", "root"))
        for path in dirs:
            path.mkdir(parents=True)
        return dirs  # type: ignore[return-value]

    mounts = []
    for i in range(runs * 5):
        upper, work, root = sandbox_dirs(f"m{i}")
        start = time.perf_counter()
        mount_overlay([layer.path], upper, work, root)
        mounts.append((time.perf_counter() - start) * 1000)
        unmount_overlay(root)
    report["overlay_mount"] = summary(mounts)

    disks = []
    mkfs = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"]
    for i in range(max(3, runs // 2)):
        image, target = scratch / f"disk{i}.img", scratch / f"disk{i}"
        target.mkdir()
        start = time.perf_counter()
        with open(image, "wb") as f:
            f.truncate(1 << 30)
        run(*mkfs, str(image))
        run("mount", "-o", "loop,nosuid,nodev", str(image), str(target))
        disks.append((time.perf_counter() - start) * 1000)
        run("umount", str(target))
        image.unlink()
    report["loop_ext4_1gib_disk"] = summary(disks)

    host = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"]
    host += ["--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"]
    plain = [timed(lambda: run(*BWRAP, *host, *TAIL)) for _ in range(runs)]
    report["start_host_template"] = summary(plain)
    starts = []
    for i in range(runs):
        upper, work, root = sandbox_dirs(f"s{i}")
        start = time.perf_counter()
        mount_overlay([layer.path], upper, work, root)
        run(*BWRAP, "--bind", str(root), "/", *TAIL)
        starts.append((time.perf_counter() - start) * 1000)
        unmount_overlay(root)
    report["start_overlay_template"] = summary(starts)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0 or not (ARCHIVE / "Release").is_file():
        raise SystemExit("run as root after `make setup` (it makes the local Debian archive)")
    scratch = Path(tempfile.mkdtemp(prefix="corral-layers-"))
    try:
        print_report(bench(scratch, args.runs), args.json)
    finally:
        # Whatever a failed run left mounted under the scratch dir, deepest first.
        mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in reversed([m for m in mounted if m.startswith(f"{scratch}/")]):
            subprocess.run(["umount", target], check=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""OCI import: what pulling a ~30 MB image into the layer store costs, by transport.

    uv run python benchmarks/oci.py --json      # as root, after `make setup`

Builds a two-layer image from this host's Debian files (its Python standard library:
~40 MB of file data, 25 MB of it libpython's static archive, ~10 MB gzipped; a small top
layer with a whiteout), writes it as an OCI layout, a docker-archive (uncompressed
layers) and a push to Debian's docker-registry on a loopback port, then times
`corral.images.oci.pull` of each into a fresh store (cold) and once more into the same
store (warm: the layers exist; each blob is verified and decompressed to check its
diff_id, but not unpacked or digested again), and skopeo's own copy from the registry
to a layout (the part of a pull that is not Corral's). Medians of --runs; the 1-minute
load average around it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' kit

from common import print_report

from corral.images import LayerStore
from corral.images.oci import pull
from tests.kit.oci_images import (
    directory,
    layer,
    member,
    skopeo_copy,
    start_registry,
    write_layout,
)

# Debian's python3 standard library (`make setup` installs python3), not the interpreter
# running this script, which may be another build.
SOURCE = min(Path("/usr/lib").glob("python3.[0-9]*"))
SKIPPED = {"__pycache__", "site-packages", "dist-packages", "test", "idlelib", "tkinter"}


def stdlib_layer() -> bytes:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if Path(info.name).name in SKIPPED else info

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(SOURCE, arcname=str(SOURCE.relative_to("/")), filter=keep)
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def timed_s(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_s(samples: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(samples), 3), "runs": len(samples)}


def bench(scratch: Path, runs: int) -> dict[str, Any]:
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    top = layer(
        directory(str(SOURCE.relative_to("/"))),
        member(f"{SOURCE.relative_to('/')}/.wh.antigravity.py"),
        member("etc/motd", b"benchmark\n"),
    )
    image = write_layout(scratch / "image", [stdlib_layer(), top], {"Cmd": ["/bin/sh"]})
    archive = scratch / "image.docker.tar"
    skopeo_copy(f"oci:{image}:1", f"docker-archive:{archive}:corral/bench:1")
    report["blob_bytes"] = sum(p.stat().st_size for p in (image / "blobs/sha256").iterdir())

    (scratch / "registry").mkdir()
    with start_registry(scratch / "registry", None) as registry:
        report["push_s"] = round(timed_s(lambda: registry.push(image, "corral/bench:1")), 3)
        sources = {
            "registry": f"docker://{registry.host}/corral/bench:1",
            "oci_layout": f"oci:{image}:1",
            "docker_archive": f"docker-archive:{archive}",
        }
        for name, reference in sources.items():
            cold, warm = [], []
            for run in range(runs):
                store = LayerStore(scratch / f"store-{name}-{run}")
                cold.append(timed_s(lambda: pull(reference, store)))  # noqa: B023
                warm.append(timed_s(lambda: pull(reference, store)))  # noqa: B023
                pulled = pull(reference, store)
                report["file_bytes"] = pulled.size_bytes
                shutil.rmtree(store.root)
            report[f"pull_{name}_cold"] = median_s(cold)
            report[f"pull_{name}_warm"] = median_s(warm)
        copies = []
        for run in range(runs):
            target = scratch / f"copy{run}"
            destination, insecure = f"oci:{target}:1", "--src-tls-verify=false"
            copies.append(timed_s(lambda: skopeo_copy(sources["registry"], destination, insecure)))  # noqa: B023
            shutil.rmtree(target)
        report["skopeo_copy_registry_s"] = median_s(copies)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    args = parser.parse_args()
    if (
        os.geteuid() != 0
        or shutil.which("skopeo") is None
        or shutil.which("docker-registry") is None
    ):
        raise SystemExit("run as root after `make setup` (skopeo, docker-registry)")
    with tempfile.TemporaryDirectory(prefix="corral-oci-bench-") as scratch:
        print_report(bench(Path(scratch), args.runs), args.json)


if __name__ == "__main__":
    main()

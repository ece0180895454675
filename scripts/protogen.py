"""Generate the Python code of the protos (`make proto`).

    uv run python scripts/protogen.py           # regenerate src/corral/v1/ and src/corral/envd/
    uv run python scripts/protogen.py --check   # fail if the checked-in code is stale

Two packages: proto/corral/v1 is Corral's API; proto/corral/envd reproduces E2B envd's
process and filesystem services (for the official `e2b` SDK).

The tools are pinned dev dependencies (grpcio-tools ships protoc; the Connect plugin is
protoc-gen-connectrpc), so the output is byte-for-byte reproducible. The messages stay
Google's `protobuf` (the plugin's `protobuf=google` option), not connectrpc's default
protobuf-py.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGES = (Path("corral") / "v1", Path("corral") / "envd")
OUT_DIR = ROOT / "src"


def init_text(package: Path) -> str:
    return f'"""Code generated from proto/{package}/*.proto by `make proto`. DO NOT EDIT."""\n'


def generate(out: Path, package: Path) -> Path:
    """Generate `package` into `out`; returns the package directory written."""
    plugin = shutil.which("protoc-gen-connectrpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        sys.exit("protoc-gen-connectrpc is missing: run `uv sync` (it is a dev dependency)")
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / package).glob("*.proto"))
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={out}", f"--pyi_out={out}", f"--connectrpc_out={out}",
            "--connectrpc_opt=protobuf=google", f"--plugin=protoc-gen-connectrpc={plugin}",
            *protos,
        ],
        check=True,
        cwd=PROTO_DIR,
    )  # fmt: skip
    (out / package / "__init__.py").write_text(init_text(package))
    return out / package


def stale(generated: Path, checked_in: Path) -> list[str]:
    names = {p.name for p in generated.iterdir()} | {
        p.name for p in checked_in.glob("*") if p.is_file() and p.suffix in (".py", ".pyi")
    }
    return sorted(
        name
        for name in names
        if not (checked_in / name).is_file()
        or not (generated / name).is_file()
        or not filecmp.cmp(generated / name, checked_in / name, shallow=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; change nothing")
    args = parser.parse_args()
    failed = False
    for package in PACKAGES:
        with tempfile.TemporaryDirectory() as tmp:
            generated = generate(Path(tmp), package)
            target = OUT_DIR / package
            if args.check:
                if differ := stale(generated, target):
                    names = ", ".join(differ)
                    print(f"{package}: generated code is stale ({names}): run `make proto`")
                    failed = True
                continue
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(generated, target)
        print(f"generated {target.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

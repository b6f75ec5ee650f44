"""Generate Python code and type stubs for proto/ into libs/contracts/src.

Runs ``grpc_tools.protoc`` with the mypy-protobuf plugins, so the generated tree carries
``*_pb2.py``, ``*_pb2_grpc.py`` and their ``.pyi`` stubs. With ``--check`` it generates into a
temporary directory and fails when the committed tree differs, which keeps the contracts current.
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
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "libs" / "contracts" / "src"
PACKAGE = "foredeck"
# Hand-written files that live in the generated tree's root and survive regeneration.
KEEP = {"py.typed"}


def _protoc_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).parent / "_proto"


def generate(out: Path) -> None:
    """Generate every proto under proto/foredeck into ``out``."""
    protos = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).rglob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files under proto/foredeck")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{_protoc_include()}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p) for p in protos),
    ]
    # mypy-protobuf reports every file it writes on stderr; show protoc's output only on failure.
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}")
    # Every directory becomes a regular package so mypy and importers see one layout; the
    # top-level ``foredeck`` stays a namespace-free package owned by this distribution.
    for directory in [out / PACKAGE, *(d for d in (out / PACKAGE).rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    (out / PACKAGE / "py.typed").touch()


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            ours, theirs = _tree(OUT_ROOT / PACKAGE), _tree(fresh / PACKAGE)
            stale = sorted(
                name
                for name in ours.keys() | theirs.keys()
                if name not in ours
                or name not in theirs
                or not filecmp.cmp(ours[name], theirs[name], shallow=False)
            )
            if stale:
                print("generated code is stale; run `make proto`:", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print("generated code is current")
            return 0
        target = OUT_ROOT / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fresh / PACKAGE, target)
        print(f"generated {sum(1 for _ in target.rglob('*_pb2.py'))} modules into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate the Python gRPC code for facemux.v1 from the .proto files.

    python proto/generate.py          # rewrite proto/facemux/v1/*_pb2*.py(i)
    python proto/generate.py --check  # exit 1 when the committed code drifted

The generated modules are committed so that the client installs without grpcio-tools;
CI runs --check so they can never disagree with the .proto files. grpcio-tools is pinned in
pyproject.toml because another protoc version writes different (equally valid) code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "facemux" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # only needed here, not at run time

    sources = sorted(PACKAGE_DIR.glob("*.proto"))
    # protoc's own include path holds the well-known types (descriptor.proto...).
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "facemux" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _committed() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        if args.check:
            fresh_names = {p.name for p in fresh}
            old_names = {p.name for p in _committed()}
            drift = sorted(fresh_names ^ old_names)
            drift += [
                p.name
                for p in fresh
                if p.name in old_names and not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)
            ]
            if drift:
                print("generated code is out of date: " + ", ".join(drift), file=sys.stderr)
                print("run: python proto/generate.py", file=sys.stderr)
                return 1
            print(f"generated code matches the .proto files ({len(fresh)} files)")
            return 0
        for stale in _committed():
            stale.unlink()
        for p in fresh:
            shutil.copy2(p, PACKAGE_DIR / p.name)
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerates the Python code of the protos: `python protos/generate.py [OUT_DIR]`.

The generated modules live beside their .proto files (protos/pagedserve/v1/) and are
never edited by hand; tests/common/test_protos.py fails when they are stale.
"""

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTOS_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTOS_ROOT) for p in PROTOS_ROOT.glob("pagedserve/v1/*.proto"))


def generate(out_dir: Path) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS_ROOT)

"""The generated code beside the protos is what `make protos` would write today."""

import filecmp
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "protos"))

from generate import PROTO_FILES, generate  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_tools import protoc  # noqa: E402


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    committed = REPO / "protos" / "pagedserve" / "v1"
    regenerated = tmp_path / "pagedserve" / "v1"
    names = sorted(p.name for p in regenerated.iterdir())
    assert names, "protoc wrote nothing"
    stale = [name for name in names if not filecmp.cmp(regenerated / name, committed / name, shallow=False)]
    assert not stale, f"stale generated files (run `make protos`): {stale}"


def test_every_field_and_rpc_is_documented(tmp_path: Path) -> None:
    # A comment on every field is part of the contract; protoc's source info says which
    # declarations carry one.
    descriptor_set = tmp_path / "protos.pb"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{REPO / 'protos'}",
                "--include_source_info",
                f"--descriptor_set_out={descriptor_set}",
                *map(str, PROTO_FILES),
            ]
        )
        == 0
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    undocumented = []
    for file in files:
        commented = {
            tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
        }
        for m, message in enumerate(file.message_type):
            for f, field in enumerate(message.field):
                # 4 = message_type, 2 = field (descriptor.proto's field numbers).
                if (4, m, 2, f) not in commented:
                    undocumented.append(f"{file.name}: {message.name}.{field.name}")
        for s, service in enumerate(file.service):
            for r, rpc in enumerate(service.method):
                if (6, s, 2, r) not in commented:
                    undocumented.append(f"{file.name}: {service.name}.{rpc.name}")
    assert not undocumented

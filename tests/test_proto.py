"""The committed Python stubs are what the proto generates, and the contract is documented."""
from pathlib import Path

import pytest
from grpc_tools import protoc

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
GENERATED = ["rollout_pb2.py", "rollout_pb2.pyi", "rollout_pb2_grpc.py"]


def test_stubs_match_proto(tmp_path):
    # protoc in-process, exactly as `make proto` runs it (its first argument is the program name)
    assert protoc.main(["protoc", "-I", str(REPO / "proto"), f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(REPO / "proto/fastgrpo/v1/rollout.proto")]) == 0
    for name in GENERATED:
        fresh = (tmp_path / "fastgrpo/v1" / name).read_text()
        committed = (REPO / "proto/python/fastgrpo/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_every_message_field_is_commented():
    """Each field line of the proto has a comment on it or right above it (the proto is the docs)."""
    lines = (REPO / "proto/fastgrpo/v1/rollout.proto").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package", "option"))
        if is_field and "//" not in s and not lines[i - 1].strip().startswith("//"):
            missing.append(f"{i + 1}: {s}")
    assert not missing, "undocumented proto fields:\n" + "\n".join(missing)

"""Nothing that arrives over the network is unpickled: no pickle, no torch.load outside the learner's
own local checkpoints (read with weights_only=True), and tensor bytes become tensors only as raw
values of their declared dtype and shape, whatever they hold (a pickle that would run code included).
"""
import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from fastgrpo.wire.tensors import TensorMeta, decode_tensor

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bmarshal\.loads?\(|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True")


def _sources():
    for root in ("services", "clients", "proto/python", "common/python", "fixture", "benchmarks"):
        yield from (REPO / root).rglob("*.py")


def test_no_unpickling_on_network_paths():
    hits = []
    for path in _sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if UNSAFE.search(line):
                rel = path.relative_to(REPO).as_posix()
                # the learner's own checkpoint, written by itself, read as plain tensors only
                if rel == "services/learner/fastgrpo/learner/checkpoint.py" and "weights_only=True" in line:
                    continue
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "unpickling found:\n" + "\n".join(hits)


class _Exploit:
    """Unpickling this creates a directory: the mark that received bytes were run as a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _payload(marker: Path, floats: int) -> bytes:
    """A protocol-0 pickle that runs os.mkdir(marker) when loaded, zero-padded to `floats` float32s.
    Its bytes are ASCII, so as float32 values they are all finite (no exponent of all ones)."""
    raw = pickle.dumps(_Exploit(marker), protocol=0)
    assert len(raw) <= 4 * floats
    return raw + bytes(4 * floats - len(raw))


def _meta(name: str, raw: bytes, shape: tuple[int, ...]) -> TensorMeta:
    return TensorMeta(name, torch.float32, shape, len(raw), hashlib.sha256(raw).hexdigest())


def test_tensor_bytes_are_values_never_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    raw = _payload(marker, 64)
    t = decode_tensor(_meta("w", raw, (8, 8)), raw)
    assert not marker.exists()
    assert t.dtype == torch.float32 and t.shape == (8, 8)
    assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == raw  # exactly the bytes, as values

    # a torch.save archive (a zip holding a pickle) is likewise just bytes
    saved = tmp_path / "t.pt"
    torch.save(torch.arange(6, dtype=torch.float32), saved)
    archive = saved.read_bytes()
    archive += bytes(-len(archive) % 4)
    t = decode_tensor(_meta("w", archive, (len(archive) // 4,)), archive)
    assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == archive


@pytest.mark.service
def test_a_pickle_pushed_as_weights_is_served_as_raw_values(tiny_dir, start_service, tmp_path):
    from fastgrpo.client import RolloutClient

    app = start_service(tiny_dir)
    marker = tmp_path / "pwned"
    name = "model.norm.weight"
    shape = tuple(app.servicer.policy.params[name].shape)
    raw = _payload(marker, shape[0])
    values = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)
    with RolloutClient(f"127.0.0.1:{app.port}") as client:
        [result] = client.push_weights({name: values}, "full", verify=False)
        assert result.version == 1
    assert not marker.exists()
    served = app.servicer.policy.params[name]
    assert served.reshape(-1).view(torch.uint8).numpy().tobytes() == raw


def test_the_exploit_is_real(tmp_path):
    """Guards the two tests above: the payload does run code when unpickled, so their markers'
    absence means something."""
    marker = tmp_path / "pwned"
    raw = _payload(marker, 64)
    pickle.loads(raw.rstrip(b"\0"))
    assert marker.is_dir()

"""Nothing that arrives over the network is unpickled: no pickle, no torch.load outside the learner's
own local checkpoints (read with weights_only=True), and tensors decode only through frombuffer."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bmarshal\.loads?\(|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True")


def _sources():
    for root in ("services", "clients", "proto/python", "benchmarks"):
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


def test_tensor_decoding_is_raw_bytes_only():
    src = (REPO / "proto/python/fastgrpo/wire/tensors.py").read_text()
    assert "torch.frombuffer" in src and "import pickle" not in src and "torch.load(" not in src

"""Packs a cached fixture (target + its draft) for a GPU machine that cannot build it: bfloat16
weights, one .tar.gz split into pieces small enough to carry one per device call.

The GPU benchmarks load the target in bfloat16 anyway and DraftHead.load casts the draft onto the
target's dtype, so casting here (round to nearest even, like the cast at load time) changes no
weight they compute with and halves what travels. The archive unpacks to `<preset>-<hash12>/` with
the one draft directory `build_draft` resolves to, so `build_fixture` and `build_draft` hit the
cache under $FASTGRPO_CACHE (or ~/.cache/fastgrpo) instead of training for half an hour.

    python benchmarks/device/pack_fixture.py --preset bench --out .gpu
    cat .gpu/part-* | tar xz -C ~/.cache/fastgrpo       # on the GPU machine
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastgrpo.fixture import build_fixture
from fastgrpo.fixture.draft import build_draft


def bf16_safetensors(src: Path, dst: Path) -> None:
    """Copies a safetensors file with every floating tensor cast to bfloat16 (metadata kept)."""
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=metadata)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, time.time()
    tar.addfile(info, io.BytesIO(data))


def pack(preset: str, out: Path, piece_bytes: int) -> list[Path]:
    fixture = build_fixture(preset)  # a cache hit here: packing never trains
    draft = build_draft(fixture)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    archive = out / "fixture.tar.gz"
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        files = [p for p in sorted(fixture.iterdir()) if p.is_file() and not p.name.startswith(".")]
        files += sorted(draft.iterdir())
        for path in files:
            name = f"{fixture.name}/{path.relative_to(fixture)}"
            if path.suffix == ".safetensors":
                cast = Path(tmp) / path.name
                bf16_safetensors(path, cast)
                tar.add(cast, name)
            elif path.name == "config.json":
                config = json.loads(path.read_text())
                config["dtype"] = "bfloat16"  # what from_pretrained(dtype="auto") then loads in
                add_bytes(tar, name, (json.dumps(config, indent=2) + "\n").encode())
            else:
                tar.add(path, name)
            print(f"  {name}", flush=True)
    data = archive.read_bytes()
    archive.unlink()
    pieces = []
    for i in range(0, len(data), piece_bytes):
        pieces.append(out / f"part-{i // piece_bytes}")
        pieces[-1].write_bytes(data[i : i + piece_bytes])
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", help="fixture preset (default: bench)")
    parser.add_argument("--out", default=".gpu", help="folder for part-0, part-1, ... (default: .gpu, git-ignored)")
    parser.add_argument("--piece-mb", type=float, default=60.0,
                        help="largest piece in MB (10^6 bytes); a device call carries at most 64 MiB, tree included (default: 60)")
    args = parser.parse_args()
    pieces = pack(args.preset, Path(args.out), int(args.piece_mb * 1e6))
    for p in pieces:
        print(f"{p}  {p.stat().st_size / 1e6:.1f} MB")
    print(f"{len(pieces)} pieces, {sum(p.stat().st_size for p in pieces) / 1e6:.1f} MB in all")


if __name__ == "__main__":
    main()

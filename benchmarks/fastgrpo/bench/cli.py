"""`fastgrpo-bench`: measured speed, written as JSON (and a PNG) to benchmarks/results/."""
from __future__ import annotations

import argparse
import logging
import sys

from fastgrpo.common.config import add_dataclass_args, from_args


def main(argv: list[str] | None = None) -> int:
    from fastgrpo.bench.calibrate import CalibrateBenchConfig, run as run_calibrate
    from fastgrpo.bench.concurrency import ConcurrencyBenchConfig, run as run_concurrency
    from fastgrpo.bench.drift import DriftBenchConfig, run as run_drift
    from fastgrpo.bench.e2e import E2EBenchConfig, run as run_e2e
    from fastgrpo.bench.kv import KVBenchConfig, run as run_kv
    from fastgrpo.bench.peers import PeersBenchConfig, run as run_peers
    from fastgrpo.bench.push import PushBenchConfig, run as run_push
    from fastgrpo.bench.sources import SourcesBenchConfig, run as run_sources
    from fastgrpo.bench.spec import SpecBenchConfig, run as run_spec

    parser = argparse.ArgumentParser(prog="fastgrpo-bench", description="fastgrpo benchmarks")
    sub = parser.add_subparsers(dest="suite", required=True)
    spec = sub.add_parser("spec", help="speculative vs plain decoding on the same engine, per batch size")
    add_dataclass_args(spec, SpecBenchConfig)
    conc = sub.add_parser("concurrency", help="speculation modes adaptive / static / off across batch sizes and a GRPO batch")
    add_dataclass_args(conc, ConcurrencyBenchConfig)
    cal = sub.add_parser("calibrate", help="online C_peak refinement from 4x too high and 4x too low vs the profile")
    add_dataclass_args(cal, CalibrateBenchConfig)
    drift = sub.add_parser("drift", help="acceptance under GRPO with online, frozen and from-scratch drafts")
    add_dataclass_args(drift, DriftBenchConfig)
    kv = sub.add_parser("kv", help="paged KV cache: prefill and KV bytes with shared prompts vs not; decode vs the dense cache")
    add_dataclass_args(kv, KVBenchConfig)
    peers = sub.add_parser("peers", help="the rollout service (through gRPC) vs HF transformers generate / assisted generation, and the bandwidth floor")
    add_dataclass_args(peers, PeersBenchConfig)
    sources = sub.add_parser("sources", help="draft sources (head / siblings / history / all) vs plain on GRPO batches over two epochs")
    add_dataclass_args(sources, SourcesBenchConfig)
    e2e = sub.add_parser("e2e", help="real GRPO steps (learner + rollout over gRPC) per speculation mode: seconds per phase, rollout tokens/s, acceptance by source, reward")
    add_dataclass_args(e2e, E2EBenchConfig)
    push = sub.add_parser("push", help="weight pushes to 1, 2, 4 replicas over loopback gRPC (dense and LoRA deltas), and the modelled cost for Qwen2.5 1.5B / 7B at R = 1 .. 64")
    add_dataclass_args(push, PushBenchConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.suite == "spec":
        run_spec(from_args(SpecBenchConfig, args))
    elif args.suite == "concurrency":
        run_concurrency(from_args(ConcurrencyBenchConfig, args))
    elif args.suite == "calibrate":
        run_calibrate(from_args(CalibrateBenchConfig, args))
    elif args.suite == "drift":
        run_drift(from_args(DriftBenchConfig, args))
    elif args.suite == "kv":
        run_kv(from_args(KVBenchConfig, args))
    elif args.suite == "peers":
        run_peers(from_args(PeersBenchConfig, args))
    elif args.suite == "sources":
        run_sources(from_args(SourcesBenchConfig, args))
    elif args.suite == "e2e":
        run_e2e(from_args(E2EBenchConfig, args))
    elif args.suite == "push":
        run_push(from_args(PushBenchConfig, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

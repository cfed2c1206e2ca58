"""`fastgrpo-bench push`: what pushing a policy change from one learner to R rollout replicas costs.

Measured (this machine): real UpdateWeights pushes over loopback gRPC, from one client to 1, 2 and 4
rollout service processes serving the fixture policy in bfloat16 (the dtype a GPU serves, so a
parameter costs the 2 bytes on the wire it costs there): a dense delta of every tensor (an Adam step
moves every parameter) and LoRA deltas of rank 2r on q,k,v,o,gate,up,down (what the learner's pusher
sends after its first push: fastgrpo.learner.push), each verified by checksum against a mirror.
Also the rates of the two host paths every pushed byte takes whatever the link: encoding (tensor
bytes, sha256, protobuf chunks; per replica) and the checksum's digests of the new values.

Modelled (written beside the measurements, under "modelled"): bytes of the same deltas for Qwen2.5
1.5B and 7B, counted from the real shapes (models built on the meta device), and the time of R
sequential pushes from one sender's link, R = 1 .. 64, at 10 / 25 / 100 / 400 Gb/s, with the replica
count where one sender stops fitting a step-time budget. docs/push-cost.md reads both.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINKS_GBPS = (10, 25, 100, 400)
MODEL_REPLICAS = (1, 2, 4, 8, 16, 32, 64)
MODEL_RANKS = (8, 16, 64)
# Qwen2.5 shapes, from the models' config.json on the Hugging Face hub
QWEN25 = {
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class PushBenchConfig:
    out: str = help_field("benchmarks/results/push-cost-cpu.json", "JSON output path")
    preset: str = help_field("default", "fixture preset the replicas serve")
    replicas: str = help_field("1,2,4", "replica counts measured (one service process each; the largest is started)")
    lora_ranks: str = help_field("8,16,32", "LoRA ranks r measured (pushed as rank-2r factors; 2r must fit the fixture's smallest projection)")
    repeats: int = help_field(5, "pushes per (delta, replica count); the median counts")
    dtype: str = help_field("bfloat16", "dtype the replicas serve (and the wire carries)")
    step_seconds: str = help_field("1.5B=30,7B=60", "modelled GRPO step seconds per model (an assumption, stated in the doc)")
    budget: float = help_field(0.1, "modelled share of a step a push may take before one sender counts as saturated")


# ---- the model: pure arithmetic over shapes ------------------------------------------------------

def shape_counts(config) -> dict:
    """Parameters of a causal LM (tied weights once) and its LoRA parameters per unit of rank, from a
    model built on the meta device: sum over the adapted linears of (in + out)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    lora_per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    return {"params": params, "lora_params_per_rank": lora_per_rank}


def delta_bytes(counts: dict, kind: str, rank: int = 0, bytes_per_param: int = 2) -> int:
    """Bytes of one push: every parameter for a dense delta; rank-2r factors for a LoRA delta (the
    change B A - B' A' since the last push, fastgrpo.learner.push)."""
    if kind == "dense":
        return counts["params"] * bytes_per_param
    return 2 * rank * counts["lora_params_per_rank"] * bytes_per_param


def sequential_seconds(nbytes: int, replicas: int, link_gbps: float) -> float:
    """R pushes through one sender's link, one after another or concurrently alike: R x bytes / link."""
    return replicas * nbytes * 8 / (link_gbps * 1e9)


def saturating_replicas(nbytes: int, link_gbps: float, budget_s: float) -> int:
    """The most replicas one sender serves within budget_s (0: not even one)."""
    return math.floor(budget_s * link_gbps * 1e9 / (8 * nbytes))


def pipelined_seconds(nbytes: int, replicas: int, link_gbps: float, chunk_bytes: int, fanout: int = 1) -> float:
    """A relay tree of the given fanout (1: a chain) below the sender, forwarding chunks as they
    arrive: every node sends `fanout` copies through its own link, and the last chunk reaches the
    deepest replica depth hops after the first: fanout x (bytes + depth x chunk) / link. Depth d
    holds fanout + fanout^2 + ... + fanout^d replicas."""
    depth, reached = 0, 0
    while reached < replicas:
        depth += 1
        reached += fanout ** depth
    return fanout * (nbytes + depth * chunk_bytes) * 8 / (link_gbps * 1e9)


def modelled(step_seconds: dict[str, float], budget: float) -> dict:
    """The modelled tables for QWEN25: sizes, sequential push seconds, saturation points."""
    from fastgrpo.wire.tensors import MAX_CHUNK_BYTES
    from transformers import Qwen2Config

    out = {"links_gbps": list(LINKS_GBPS), "replicas": list(MODEL_REPLICAS), "ranks": list(MODEL_RANKS),
           "bytes_per_param": 2, "budget_share_of_step": budget, "chunk_bytes": MAX_CHUNK_BYTES, "models": {}}
    for name, shape in QWEN25.items():
        counts = shape_counts(Qwen2Config(**shape))
        step = step_seconds[name.split("-", 1)[1]]
        deltas = {"dense": delta_bytes(counts, "dense"),
                  **{f"lora_r{r}": delta_bytes(counts, "lora", r) for r in MODEL_RANKS}}
        out["models"][name] = {
            "shape": shape, **counts, "lora_params": {r: r * counts["lora_params_per_rank"] for r in MODEL_RANKS},
            "step_seconds_assumed": step,
            "deltas": {kind: {
                "bytes": nb,
                "sequential_seconds": {g: {r: sequential_seconds(nb, r, g) for r in MODEL_REPLICAS} for g in LINKS_GBPS},
                "replicas_within_budget": {g: saturating_replicas(nb, g, budget * step) for g in LINKS_GBPS},
                "replicas_within_step": {g: saturating_replicas(nb, g, step) for g in LINKS_GBPS},
                "chain_seconds_64": {g: pipelined_seconds(nb, 64, g, MAX_CHUNK_BYTES, 1) for g in LINKS_GBPS},
                "binary_tree_seconds_64": {g: pipelined_seconds(nb, 64, g, MAX_CHUNK_BYTES, 2) for g in LINKS_GBPS},
            } for kind, nb in deltas.items()},
        }
    return out


# ---- the measurement ----------------------------------------------------------------------------

def _dense_delta(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small change of every tensor, in the served dtype."""
    return {n: (1e-3 * torch.randn(t.shape, generator=gen)).to(t.dtype) for n, t in state.items()}  # like t


def _lora_delta(state: dict[str, torch.Tensor], rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Rank-2r factors for every adapted projection, as the pusher sends them after its first push."""
    out = {}
    for name, w in state.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LORA_TARGETS:
            out[f"{name}.lora_A"] = 1e-2 * torch.randn(2 * rank, w.shape[1], generator=gen)  # (2r, in)
            out[f"{name}.lora_B"] = 1e-2 * torch.randn(w.shape[0], 2 * rank, generator=gen)  # (out, 2r)
    return out


def _sync(addresses: list[str], state: dict[str, torch.Tensor]):
    """Every replica serves `state` at one common version (a full push to each); its mirror."""
    from fastgrpo.client import RolloutClient, WeightMirror

    clients = [RolloutClient(a) for a in addresses]
    try:
        version = 1 + max(c.status().policy_version for c in clients)
        for c in clients:
            c.push_weights(state, "full", base_version=c.status().policy_version, new_version=version)
    finally:
        for c in clients:
            c.close()
    return WeightMirror(state, version)


def host_rates(tensors: dict[str, torch.Tensor], repeats: int) -> dict:
    """Bytes (of the tensors as sent) per second of the two host paths every pushed byte takes, on
    one core, no network; the fastest of `repeats` counts:
      encode  the sender, per replica: tensor bytes, sha256, serialised UpdateWeights messages;
      digest  the replica and the sender's mirror, per push: sha256 of every changed tensor's new
              values as float32 (fastgrpo.wire.tensors.tensor_digest), the weight checksum's input."""
    from fastgrpo.client.weights import update_stream
    from fastgrpo.wire.tensors import tensor_digest

    def encode() -> int:
        total, messages = update_stream(tensors, "dense_delta", 0, 1)
        for m in messages:
            m.SerializeToString()
        return total

    def digest() -> int:
        for t in tensors.values():
            tensor_digest(t)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    out = {}
    for name, work in (("encode", encode), ("digest", digest)):
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            nbytes = work()
            seconds.append(time.perf_counter() - t0)
        out[name] = {"bytes": nbytes, "seconds_runs": seconds, "bytes_per_s": nbytes / min(seconds)}
    return out


def fit(records: list[dict]) -> dict:
    """Least squares seconds = per_push + replicas x per_replica + total bytes / bytes_per_s over the
    measured pushes: the fixed costs (status call, planning; one call per replica) apart from the
    per-byte rate."""
    import numpy as np

    x = np.array([[1.0, r["replicas"], r["bytes_total"]] for r in records])  # (N, 3)
    y = np.array([r["seconds"] for r in records])  # (N,)
    (per_push, per_replica, per_byte), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"per_push_s": float(per_push), "per_replica_s": float(per_replica),
            "bytes_per_s": float(1 / per_byte) if per_byte > 0 else float("inf")}


def run(cfg: PushBenchConfig) -> dict:
    from fastgrpo.bench.common import write_results
    from fastgrpo.client import RolloutClient
    from fastgrpo.client.local import ServiceProcess
    from fastgrpo.fixture import build_fixture
    from fastgrpo.wire.dtypes import dtype_from_name
    from fastgrpo.wire.tensors import unique_state
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    counts_r = [int(r) for r in cfg.replicas.split(",")]
    ranks = [int(r) for r in cfg.lora_ranks.split(",")]
    steps = {k: float(v) for k, v in (kv.split("=") for kv in cfg.step_seconds.split(","))}
    fixture = build_fixture(cfg.preset)
    dtype = dtype_from_name(cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(fixture), dtype=torch.float32)
    state = {n: t.detach().to(dtype) for n, t in unique_state(model.state_dict()).items()}
    fixture_counts = shape_counts(model.config)
    gen = torch.Generator().manual_seed(0)
    deltas = {"dense": ("dense_delta", 0)} | {f"lora_r{r}": ("lora_delta", r) for r in ranks}
    records = []
    load_before = os.getloadavg()  # the machine may be shared: a busy one slows every figure
    t_start = time.perf_counter()
    procs = []
    try:
        for _ in range(max(counts_r)):
            procs.append(ServiceProcess(fixture, "--dtype", cfg.dtype, threads=1))
        for n in counts_r:
            addresses = [p.address for p in procs[:n]]
            mirror = _sync(addresses, state)
            with RolloutClient(addresses) as client:
                for label, (kind, rank) in deltas.items():
                    runs, server = [], []
                    for _ in range(cfg.repeats):
                        tensors = _dense_delta(mirror.state, gen) if kind == "dense_delta" else _lora_delta(mirror.state, rank, gen)
                        t0 = time.perf_counter()
                        # lora_scale: alpha / r, the learner's defaults (16 / 8)
                        results = client.push_weights(tensors, kind, lora_scale=2.0, mirror=mirror)
                        runs.append(time.perf_counter() - t0)
                        server.append(statistics.median(r.seconds for r in results))
                    nbytes = results[0].bytes_received
                    seconds = statistics.median(runs)
                    rec = {"delta": label, "kind": kind, "rank": rank, "replicas": n, "bytes_per_replica": nbytes,
                           "bytes_total": n * nbytes, "seconds_runs": runs, "seconds": seconds,
                           "mb_per_s": n * nbytes / seconds / 1e6, "server_seconds_median": statistics.median(server)}
                    records.append(rec)
                    print(f"R={n} {label:9s} {nbytes / 1e6:7.3f} MB/replica  {seconds * 1e3:8.1f} ms  "
                          f"{rec['mb_per_s']:7.1f} MB/s  (server {rec['server_seconds_median'] * 1e3:.1f} ms/replica)", flush=True)
    finally:
        for p in procs:
            p.stop()
    rates = host_rates(_dense_delta(state, gen), cfg.repeats)
    fitted = fit(records)
    print(f"host paths: encode {rates['encode']['bytes_per_s'] / 1e6:.0f} MB/s, digest {rates['digest']['bytes_per_s'] / 1e6:.0f} MB/s; "
          f"fit: {fitted['per_push_s'] * 1e3:.1f} ms per push "
          f"+ {fitted['per_replica_s'] * 1e3:.1f} ms per replica + bytes at {fitted['bytes_per_s'] / 1e6:.0f} MB/s; "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    path = write_results(cfg.out, "push", records, measured_on="loopback gRPC, one client, replicas as separate processes",
                         served_dtype=cfg.dtype, fixture=str(fixture.name), fixture_counts=fixture_counts,
                         load_average_1min={"before": load_before[0], "after": os.getloadavg()[0]},
                         host_rates=rates, fit=fitted, modelled=modelled(steps, cfg.budget), config=cfg.__dict__)
    print(f"wrote {path}")
    return {"path": str(path), "records": records, "fit": fitted, "host_rates": rates}

"""Decode steps as functions of device tensors: padded to a few shapes, optionally compiled, with
one device-to-host transfer per step, after it.

A step's inputs cross to the device in one copy per dtype, its outputs come back in one
(`to_host_rows`), and nothing between reads a value on the host: what to emit and who finished are
decided once per step, in Python, on the numbers that came back. A compiled step
(`torch.compile(fullgraph=True)`, and on CUDA its CUDA graphs) pads the batch to a power of two
(`bucket`) and is traced once per batch bucket, then replayed while the batch changes inside it;
the block table is padded to a power of two of blocks too, a symbolic size of the one graph.
Padding rows decode token 0 at position 0 into the scratch block (runtime.kv_cache), greedily,
and are cut from the results.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.kv_cache import SCRATCH_BLOCK, padded_tables
from fastgrpo.rollout.runtime.layers import GEMV_ROWS
from fastgrpo.rollout.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
# graphs one compiled step may hold (batch buckets x sampling variants, and room to spare)
RECOMPILE_LIMIT = 256


def bucket(n: int, cap: int | None = None) -> int:
    """The padded size of n: the next power of two (at most cap, never below n)."""
    size = 1 << max(0, n - 1).bit_length()
    return max(n, min(size, cap)) if cap is not None else size


def batch_buckets(largest: int, max_batch: int) -> list[int]:
    """The batch buckets up to `largest` (bucket, capped at max_batch): the graphs a compiled step
    holds."""
    sizes, size = [], 1
    while size <= largest:
        sizes.append(size)
        if size >= largest:
            break
        size = bucket(size + 1, max_batch)
    return sizes


# On the CPU a compiled step pays only where it turns matrix-vector products into streaming
# reductions (runtime.layers.GEMV_ROWS); at larger batches inductor's graph is slower than eager.
# Bench fixture, 2-core CPU, engine tokens/s compiled vs eager: B = 1 63 vs 38, B = 8 133 vs 200,
# B = 64 400 vs 590; a bucket takes 40-80 s to compile there (10 s from inductor's disk cache)
CPU_COMPILED_BATCH = GEMV_ROWS


def compiled_batch(mode: str, device: torch.device, max_batch: int) -> int:
    """The largest batch bucket a --compile mode compiles (0: none): auto compiles on CUDA only;
    on the CPU, on compiles the small buckets, where it pays (CPU_COMPILED_BATCH)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return 0
    return max_batch if device.type == "cuda" else min(bucket(max_batch), CPU_COMPILED_BATCH)


def profile_compiled(mode: str, device: torch.device) -> bool:
    """Whether C_peak is profiled on compiled forwards: where --compile compiles every batch (CUDA);
    on the CPU the steps that verify trees run eagerly, and so are profiled."""
    return compiled_batch(mode, device, 1) > 0 and device.type == "cuda"


def compile_step(fn, device: torch.device):
    """torch.compile of a step function: the whole step one graph (fullgraph), on CUDA replayed as
    CUDA graphs (reduce-overhead). The caller marks which sizes are symbolic (DecodeStep: the
    context's blocks) and which stay static (the batch bucket)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # (renamed across torch versions)
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    # the steps say which sizes are symbolic; a size that merely differed between two compiles
    # (another model in the same process) stays static rather than turning symbolic behind our back
    dynamo_config.automatic_dynamic_shapes = False
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, fullgraph=True, dynamic=None, mode=mode)


def compiled_forward(runner: ModelRunner):
    """runner.forward_no_sync compiled as a step is (compile_step), the new tokens per sequence a
    symbolic size: what a compiled profile times. Batches must carry key_blocks."""
    fn = compile_step(runner.forward_no_sync, runner.device)

    def forward(batch: ForwardBatch):
        torch._dynamo.mark_dynamic(batch.tokens, 1)
        torch._dynamo.mark_dynamic(batch.positions, 1)
        return fn(batch)

    return forward


def mark_static_pools(*caches) -> None:
    """On CUDA, the KV pools of caches (runtime.kv_cache.PagedKVCache) as static addresses: CUDA
    graphs may write into them only where their addresses never change."""
    for cache in caches:
        if cache.k[0].device.type == "cuda":
            for pool in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(pool)


def begin_compiled_step(device: torch.device) -> None:
    """Tells CUDA graph trees a new step begins (the previous step's outputs are consumed), so
    that replaying a step's graphs may reuse their memory."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def host_rows(*columns: torch.Tensor) -> torch.Tensor:
    """Columns (B,) or (B, n) side by side as one (B, n_total) float64 tensor, which holds every
    token id, count and float32 logprob exactly: what a step brings back in its one transfer."""
    return torch.cat([c.double().reshape(c.shape[0], -1) for c in columns], dim=1)


def table_width(runner: ModelRunner, blocks: int) -> int:
    """The block-table width a compiled step pads `blocks` to: a power of two, at most the longest
    sequence's blocks, and at least 2 (torch.compile specialises a size of 1, which would cost a
    graph of its own)."""
    return max(2, bucket(blocks, -(-runner.max_positions // runner.cache.block_size)))


def sampling_floats(params: list[tuple[float, int, float]], pad: int, device: torch.device) -> torch.Tensor:
    """(2, B + pad) float32 temperature and top_p of params (temperature, top_k, top_p) on the
    device, in one copy; padding rows greedy and untruncated."""
    return torch.tensor([[p[0] for p in params] + [0.0] * pad, [p[2] for p in params] + [1.0] * pad],
                        dtype=torch.float32).to(device)


def to_host_rows(*columns: torch.Tensor) -> list[list[float]]:
    """A step's one device-to-host transfer: host_rows(*columns) -> B lists of floats."""
    return host_rows(*columns).tolist()


@dataclass(frozen=True)
class DecodeOutput:
    """One plain decode step of B sequences, on the device, padded rows cut."""

    tokens: torch.Tensor  # (B,) long, the next token of each sequence
    logprobs: torch.Tensor  # (B,) float32, its policy logprob
    hidden: torch.Tensor  # (B, H) the target's final-norm feature at the decoded position


class DecodeStep:
    """Plain decode: each sequence's last token through the target, one token sampled per row."""

    def __init__(self, runner: ModelRunner, compiled_batch: int, max_batch: int):
        """compiled_batch: batches up to this size run the compiled step (compiled_batch), larger
        ones the same function eagerly."""
        self.runner = runner
        self.compiled_batch = min(compiled_batch, max_batch)
        self.max_batch = max_batch
        self._compiled = compile_step(self._step, runner.device) if compiled_batch else None
        if compiled_batch:
            mark_static_pools(runner.cache)

    @torch.inference_mode()
    def __call__(self, tokens: list[int], starts: list[int], tables: list[list[int]], params: list[tuple[float, int, float]],
                 seeds: list[int], drawn: list[int]) -> DecodeOutput:
        """tokens, starts: each sequence's last token and the cache position it goes to; tables its
        blocks (at least those covering starts + 1); params (temperature, top_k, top_p); seeds
        (sampler.counter_uniforms, 0 for greedy) and drawn: the tokens each sequence has drawn."""
        B = len(tokens)
        bs = self.runner.cache.block_size
        compiled = B <= self.compiled_batch
        Bp = bucket(B, self.max_batch) if compiled else B
        nb = -(-(max(starts) + 1) // bs)
        nbp = table_width(self.runner, nb) if compiled else nb
        pad = Bp - B
        ints = torch.tensor([tokens + [0] * pad, starts + [0] * pad, [p[1] for p in params] + [0] * pad,
                             seeds + [0] * pad, drawn + [0] * pad], dtype=torch.long).to(self.runner.device)  # (5, Bp)
        floats = sampling_floats(params, pad, self.runner.device)  # (2, Bp)
        table = padded_tables(tables + [[]] * pad, nbp, self.runner.device)  # (Bp, nbp)
        truncate = sampler.truncates(params)
        if compiled:  # a graph per batch bucket, the context's blocks a symbolic size
            begin_compiled_step(self.runner.device)
            torch._dynamo.mark_static(ints, 1)
            torch._dynamo.mark_dynamic(table, 1)
            next_tokens, logprobs, hidden = self._compiled(ints, floats, table, truncate)
            hidden = hidden.clone()  # (queued for the draft; a CUDA graph's next replay overwrites it)
        else:
            next_tokens, logprobs, hidden = self._step(ints, floats, table, truncate)
        return DecodeOutput(next_tokens[:B], logprobs[:B], hidden[:B])

    def _step(self, ints: torch.Tensor, floats: torch.Tensor, table: torch.Tensor, truncate: bool):
        tokens, starts, top_k, seeds, drawn = ints  # (Bp,) each
        batch = ForwardBatch(tokens[:, None], starts[:, None], table, starts, key_blocks=table.shape[1])
        out = self.runner.forward_no_sync(batch)  # logits (Bp, 1, V), hidden (Bp, 1, H)
        params = sampler.SamplingBatch(floats[0], top_k, floats[1])
        counters = sampler.draw_counters(drawn, sampler.STREAM_TOKEN)  # (Bp,)
        next_tokens, logprobs = sampler.sample_no_sync(out.logits[:, 0], params, seeds, counters, truncate)
        return next_tokens, logprobs, out.hidden[:, 0]  # (Bp,), (Bp,), (Bp, H)

    def warm_up(self) -> float:
        """Compiles every compiled batch bucket (top-k / top-p compile when first asked for); returns
        the seconds it took."""
        if not self.compiled_batch:
            return 0.0
        t0 = time.perf_counter()
        for B in batch_buckets(self.compiled_batch, self.max_batch):
            out = self(tokens=[0] * B, starts=[0] * B, tables=[[SCRATCH_BLOCK] * 2] * B,
                       params=[(0.0, 0, 1.0)] * B, seeds=[0] * B, drawn=[0] * B)
            to_host_rows(out.tokens)
        seconds = time.perf_counter() - t0
        log.info("compiled the decode step for batch buckets up to %d in %.1f s", self.compiled_batch, seconds)
        return seconds

"""Model runner: drives a transformers decoder's own modules over our KV cache.

The HF model is loaded with transformers (so any checkpoint of a supported family loads, and the
weights live in one place that updates modify), but its forward is ours: a paged KV cache read
through per-sequence block tables, per-token rotary positions and an arbitrary mask over the new
tokens. That one entry point serves
prefill (causal mask, right padding), plain decode (Q = 1) and tree verification (Q = tree nodes,
tree mask, depth-based positions) without a rewrite.

Supported families: the Llama-style decoders (Llama, Qwen2, Qwen3, Mistral): pre-norm layers of
self_attn (q/k/v/o projections, optional q/k norms) and a gated MLP, rotary positions.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from fastgrpo.rollout.runtime.batch import ForwardBatch, ForwardOutput
from fastgrpo.rollout.runtime.kv_cache import PagedKVCache
from fastgrpo.rollout.runtime.layers import decoder_layer, paged_inputs, project
from fastgrpo.wire.dtypes import DTYPES

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class ModelRunner:
    """Owns the HF model and the KV cache; one `forward` for every kind of step."""

    def __init__(self, model: PreTrainedModel, max_len: int | None = None, headroom: int = 0):
        """max_len: longest sequence served (the context limit); headroom: extra positions past it,
        where speculative tree nodes of a sequence near the limit are written. The KV cache is
        allocated separately (allocate_cache), once its budget is known."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {cfg.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # served weights never train here; a draft head sharing embedding and lm_head must not
        # accumulate gradients into them either
        self.model = model.eval().requires_grad_(False)
        self.config = cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", False) and window and window < self.max_len:
            raise ValueError(f"sliding_window {window} < context {self.max_len} is not supported; pass --max-context")
        self.max_positions = self.max_len + headroom
        self.cache: PagedKVCache | None = None
        self._decode_observers: list[Callable[[int, float], None]] = []

    @staticmethod
    def load(path: str | Path, dtype: torch.dtype, device: str, max_len: int | None = None, headroom: int = 0):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return ModelRunner(model, max_len, headroom)

    def kv_bytes_per_block(self, block_size: int) -> int:
        return PagedKVCache.bytes_per_block(self.num_layers, block_size, self.num_kv_heads, self.head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int, block_size: int, backend: str = "gather") -> PagedKVCache:
        """(Re)allocates the KV cache: num_blocks blocks of block_size tokens, every layer."""
        self.cache = None  # the old pool goes before the new one is allocated
        self.cache = PagedKVCache(self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim,
                                  self.dtype, self.device, backend)
        return self.cache

    def observe_decode_forwards(self, observer: Callable[[int, float], None]) -> None:
        """Calls observer(tokens, seconds) after every decode or verify forward (not prefill): the
        latency curve the online C_peak refinement reads."""
        self._decode_observers.append(observer)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, logits_at: torch.Tensor | None = None) -> ForwardOutput:
        """Runs the new tokens through every layer, writing their keys/values into the cache.

        logits_at (B,) picks one query index per row to project through lm_head (prefill needs only
        the last prompt token); None projects every position.
        """
        B, Q = batch.tokens.shape
        assert int(batch.starts.max()) + Q <= self.max_positions, "write past the longest sequence served"
        timed = bool(self._decode_observers) and logits_at is None  # prefill is not a decode step
        t0 = time.perf_counter() if timed else 0.0
        out = self.forward_no_sync(batch, logits_at)
        if timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.report_decode(B * Q, time.perf_counter() - t0)
        return out

    def report_decode(self, tokens: int, seconds: float) -> None:
        """A decode or verify forward of `tokens` tokens took `seconds` (a compiled step reports its own)."""
        for observe in self._decode_observers:
            observe(tokens, seconds)

    def forward_no_sync(self, batch: ForwardBatch, logits_at: torch.Tensor | None = None) -> ForwardOutput:
        """`forward` without its checks and timing, which read the device: what a compiled step
        traces (give the batch its key_blocks)."""
        B, Q = batch.tokens.shape
        inner = self.model.model
        h = inner.embed_tokens(batch.tokens)  # (B, Q, H)
        cos, sin = inner.rotary_emb(h, batch.positions)  # (B, Q, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, Q, D)
        table, write_slots, mask = paged_inputs(batch, self.cache.block_size)
        for i, layer in enumerate(inner.layers):
            h = decoder_layer(layer, h, cos, sin, mask, self.cache, i, write_slots, table, self.head_dim)
        h = inner.norm(h)  # (B, Q, H)
        if logits_at is not None:
            picked = h[torch.arange(B, device=self.device), logits_at]  # (B, H)
            return ForwardOutput(project(self.model.lm_head, picked).float(), h)  # (B, V)
        return ForwardOutput(project(self.model.lm_head, h).float(), h)  # (B, Q, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


SERVED_DTYPES = ("float32", "bfloat16", "float16")


def resolve_placement(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """--device / --dtype as given on a command line -> (torch device string, dtype). auto: cuda when
    available, else cpu; bfloat16 on a GPU, float32 on the CPU (bf16 matmuls there are slow)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in SERVED_DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(SERVED_DTYPES)}; got {dtype!r}")
    return device, DTYPES[dtype]

"""Model runner: drives a transformers decoder's own modules over our KV cache.

The HF model is loaded with transformers (so any checkpoint of a supported family loads, and the
weights live in one place that updates modify), but its forward is ours: per-sequence cache slots,
per-token rotary positions and an arbitrary mask over the new tokens. That one entry point serves
prefill (causal mask, right padding), plain decode (Q = 1) and tree verification (Q = tree nodes,
tree mask, depth-based positions) without a rewrite.

Supported families: the Llama-style decoders (Llama, Qwen2, Qwen3, Mistral): pre-norm layers of
self_attn (q/k/v/o projections, optional q/k norms) and a gated MLP, rotary positions.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from fastgrpo.rollout.engine.kv_cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ForwardBatch:
    """New tokens of B sequences, Q per sequence (right-padded where sequences have fewer).

    Cache positions below `region_start` are the sequence's settled past: every new token sees
    them. Positions from `region_start` to `starts + Q` form a region (tree nodes already in the
    cache, then the new tokens) in which `region_mask[b, q, r]` says whether new token q sees
    region position r. Default: the region is just the new tokens, causally masked.
    """

    tokens: torch.Tensor  # (B, Q) long
    positions: torch.Tensor  # (B, Q) long, rotary positions (depth-based inside a tree)
    slots: torch.Tensor  # (B,) long, KV-cache slot of each sequence
    starts: torch.Tensor  # (B,) long, cache position where the first new token is written
    region_mask: torch.Tensor | None = None  # (B, Q, R) bool; None = causal over the new tokens
    region_start: torch.Tensor | None = None  # (B,) long; None = starts (R = Q)

    def __post_init__(self):
        B, Q = self.tokens.shape
        assert self.positions.shape == (B, Q) and self.slots.shape == (B,) and self.starts.shape == (B,)
        assert self.region_mask is None or self.region_mask.shape[:2] == (B, Q)
        if self.region_start is not None:
            assert self.region_mask is not None and bool((self.starts - self.region_start + Q == self.region_mask.shape[2]).all())


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # (B, Q, V) float32, or (B, V) when logits_at was given
    hidden: torch.Tensor  # (B, Q, H): the final-norm hidden state that feeds lm_head


def attention_mask(batch: ForwardBatch, key_len: int) -> torch.Tensor:
    """(B, 1, Q, key_len) bool: True where new token q of row b may attend to cache position j."""
    B, Q = batch.tokens.shape
    device = batch.tokens.device
    start = batch.starts if batch.region_start is None else batch.region_start  # (B,)
    region = batch.region_mask
    if region is None:
        region = torch.ones(Q, Q, dtype=torch.bool, device=device).tril().expand(B, Q, Q)  # (B, Q, Q)
    R = region.shape[-1]
    j = torch.arange(key_len, device=device)  # (T,)
    past = j[None, None, :] < start[:, None, None]  # (B, 1, T)
    rel = j[None, :] - start[:, None]  # (B, T) offset of key j inside the region
    in_region = (rel >= 0) & (rel < R)  # (B, T)
    region_ok = region.gather(2, rel.clamp(0, R - 1)[:, None, :].expand(B, Q, key_len))  # (B, Q, T)
    return (past | (in_region[:, None, :] & region_ok))[:, None]  # (B, 1, Q, T)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decoder_layer(
    layer: torch.nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache | None,
    cache_layer: int,
    slots: torch.Tensor | None,
    write_pos: torch.Tensor | None,
    key_len: int,
    head_dim: int,
    query_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm Llama-family decoder layer over new tokens h (B, Q, H), attending through `cache`.

    cos/sin (B, 1, Q, D) rotary tables, mask (B, 1, Q, key_len), write_pos (B, Q) cache positions.
    With cache None the tokens attend only among themselves (mask (B, 1, Q, Q)): the differentiable
    path used to train the draft head. Shared by the target runner and the draft head.

    query_at (B,): every new token's keys and values go to the cache, but only token query_at[b] of
    row b attends and goes through the MLP; returns (B, 1, H). A one-layer draft catching up on many
    pairs needs only the last one's output, and the key and value projections are a twentieth of the
    layer's arithmetic (the rest: query, output projection, MLP).
    """
    B, Q, _ = h.shape
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # (B, Q, H)
    k = attn.k_proj(x).view(B, Q, -1, head_dim)  # (B, Q, Hkv, D)
    v = attn.v_proj(x).view(B, Q, -1, head_dim).transpose(1, 2)  # (B, Hkv, Q, D)
    cos_q, sin_q = cos, sin
    if query_at is not None:
        rows = torch.arange(B, device=h.device)
        h, x = h[rows, query_at][:, None], x[rows, query_at][:, None]  # (B, 1, H)
        # advanced indices on dims 0 and 2 put the indexed dim first: (B, 1, D) -> (B, 1, 1, D)
        cos_q, sin_q = cos[rows, :, query_at][:, :, None], sin[rows, :, query_at][:, :, None]
        mask = mask[rows, :, query_at][:, :, None]  # (B, 1, 1, T)
    Qa = x.shape[1]  # tokens that attend: Q, or 1 with query_at
    q = attn.q_proj(x).view(B, Qa, -1, head_dim)  # (B, Qa, Hq, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H*, Qa or Q, D)
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos + _rotate_half(k) * sin
    if cache is None:
        keys, values = k, v  # (B, Hkv, Q, D)
    else:
        cache.write(cache_layer, slots, write_pos, k, v)
        keys, values = cache.read(cache_layer, slots, key_len)  # (B, Hkv, T, D)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1]
    )  # (B, Hq, Qa, D)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(B, Qa, -1))  # (B, Qa, H)
    return h + layer.mlp(layer.post_attention_layernorm(h))  # (B, Qa, H)


class ModelRunner:
    """Owns the HF model and the KV cache; one `forward` for every kind of step."""

    def __init__(self, model: PreTrainedModel, num_slots: int, max_len: int | None = None, headroom: int = 0):
        """max_len: longest sequence served (the context limit); headroom: extra cache positions past
        it, where speculative tree nodes of a sequence near the limit are written."""
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
        self.cache = KVCache(
            self.num_layers, num_slots, self.num_kv_heads, self.max_len + headroom, self.head_dim, self.dtype, self.device
        )
        self.num_slots = num_slots
        # called with (tokens, seconds) after every decode or verify forward (online C_peak refinement)
        self.on_decode_forward: Callable[[int, float], None] | None = None

    @staticmethod
    def load(path: str | Path, dtype: torch.dtype, device: str, num_slots: int, max_len: int | None = None,
             headroom: int = 0):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return ModelRunner(model, num_slots, max_len, headroom)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, logits_at: torch.Tensor | None = None) -> ForwardOutput:
        """Runs the new tokens through every layer, writing their keys/values into the cache.

        logits_at (B,) picks one query index per row to project through lm_head (prefill needs only
        the last prompt token); None projects every position.
        """
        B, Q = batch.tokens.shape
        assert int(batch.starts.max()) + Q <= self.cache.max_len, "write past the end of the KV cache"
        observe = self.on_decode_forward if logits_at is None else None  # prefill is not a decode step
        t0 = time.perf_counter() if observe is not None else 0.0
        out = self._forward(batch, logits_at)
        if observe is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            observe(B * Q, time.perf_counter() - t0)
        return out

    def _forward(self, batch: ForwardBatch, logits_at: torch.Tensor | None) -> ForwardOutput:
        B, Q = batch.tokens.shape
        inner = self.model.model
        h = inner.embed_tokens(batch.tokens)  # (B, Q, H)
        cos, sin = inner.rotary_emb(h, batch.positions)  # (B, Q, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, Q, D)
        key_len = int(batch.starts.max()) + Q
        mask = attention_mask(batch, key_len)  # (B, 1, Q, T)
        write_pos = batch.starts[:, None] + torch.arange(Q, device=self.device)[None, :]  # (B, Q)
        for i, layer in enumerate(inner.layers):
            h = decoder_layer(layer, h, cos, sin, mask, self.cache, i, batch.slots, write_pos, key_len, self.head_dim)
        h = inner.norm(h)  # (B, Q, H)
        if logits_at is not None:
            picked = h[torch.arange(B, device=self.device), logits_at]  # (B, H)
            return ForwardOutput(self.model.lm_head(picked).float(), h)  # (B, V)
        return ForwardOutput(self.model.lm_head(h).float(), h)  # (B, Q, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

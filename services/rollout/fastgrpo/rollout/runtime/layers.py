"""The pieces of a Llama-family decoder forward that the target runner and the draft head share:
the attention mask of a ForwardBatch, and one pre-norm decoder layer run over HF modules through
our KV cache (or, without a cache, differentiably among the new tokens only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache, token_slots
from fastgrpo.rollout.runtime.packed import linear_packed, packable, packed_rows


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


def paged_inputs(batch: ForwardBatch, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of a forward over a paged cache needs: the block table cut (or padded with
    the scratch block) to the blocks the keys span (B, nb), the flat pool slots the new tokens are
    written to (B, Q), and the attention mask over the logical positions of those blocks (B, 1, Q,
    nb * block_size)."""
    B, Q = batch.tokens.shape
    nb = batch.key_blocks if batch.key_blocks is not None else -(-(int(batch.starts.max()) + Q) // block_size)
    table = batch.block_table[:, :nb]
    if table.shape[1] < nb:
        table = F.pad(table, (0, nb - table.shape[1]), value=SCRATCH_BLOCK)
    write_pos = batch.starts[:, None] + torch.arange(Q, device=table.device)[None, :]  # (B, Q)
    return table, token_slots(table, write_pos, block_size), attention_mask(batch, nb * block_size)


# rows (tokens) up to which a compiled CPU step computes x @ W.T as a fused multiply-reduce (larger
# ones take the packed oneDNN op, runtime.packed). A
# matrix-vector product is bound by reading W; MKL's runs on one core (about 12 GB/s on the 2-core
# CPU here) while inductor's reduction streams W on both (about 30). The bench fixture's linears
# at 1 / 2 / 4 / 8 rows: eager 19.5 / 30.7 / 25.8 / 22.6 ms, reduction 8.2 / 9.9 / 17.7 / 33.7 ms
GEMV_ROWS = 4


def project(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x). On the CPU in inference: through oneDNN's packed weights (runtime.packed) at the
    row counts where that was measured faster than MKL's (packed.tune), and in
    a compiled step as a multiply-reduce where that reads the weights faster (GEMV_ROWS), at a row
    count known when compiling (a symbolic one, such as a catch-up's pending pairs, is left to the
    matrix product rather than specialised)."""
    if not packable(linear.weight):
        return linear(x)
    if not torch.compiler.is_compiling():
        if packed_rows(x.numel() // x.shape[-1]):
            return linear_packed(x, linear.weight, linear.bias)
        return F.linear(x, linear.weight, linear.bias)
    if statically_known_true(x.numel() <= GEMV_ROWS * x.shape[-1]):
        y = (x[..., None, :] * linear.weight).sum(-1)  # (..., out)
        return y if linear.bias is None else y + linear.bias
    return torch.ops.fastgrpo.linear_packed(x, linear.weight, linear.bias)


def gated_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family MLP, down(act(gate(x)) * up(x)), through `project`."""
    return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decoder_layer(
    layer: torch.nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    cache: PagedKVCache | None,
    cache_layer: int,
    write_slots: torch.Tensor | None,
    table: torch.Tensor | None,
    head_dim: int,
    query_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm Llama-family decoder layer over new tokens h (B, Q, H), attending through `cache`.

    cos/sin (B, 1, Q, D) rotary tables; write_slots (B, Q) the flat pool slots of the new tokens,
    table (B, nb) the rows' block tables, mask (B, 1, Q, nb * block_size) over their logical positions
    (model_runner.paged_inputs).
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
    k = project(attn.k_proj, x).view(B, Q, -1, head_dim)  # (B, Q, Hkv, D)
    v = project(attn.v_proj, x).view(B, Q, -1, head_dim).transpose(1, 2)  # (B, Hkv, Q, D)
    cos_q, sin_q = cos, sin
    if query_at is not None:
        rows = torch.arange(B, device=h.device)
        h, x = h[rows, query_at][:, None], x[rows, query_at][:, None]  # (B, 1, H)
        # advanced indices on dims 0 and 2 put the indexed dim first: (B, 1, D) -> (B, 1, 1, D)
        cos_q, sin_q = cos[rows, :, query_at][:, :, None], sin[rows, :, query_at][:, :, None]
        mask = mask[rows, :, query_at][:, :, None]  # (B, 1, 1, T)
    Qa = x.shape[1]  # tokens that attend: Q, or 1 with query_at
    q = project(attn.q_proj, x).view(B, Qa, -1, head_dim)  # (B, Qa, Hq, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H*, Qa or Q, D)
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos + _rotate_half(k) * sin
    if cache is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])  # (B, Hq, Qa, D)
    else:
        cache.write(cache_layer, write_slots, k, v)
        out = cache.attend(cache_layer, q, table, mask, attn.scaling)  # (B, Hq, Qa, D)
    h = h + project(attn.o_proj, out.transpose(1, 2).reshape(B, Qa, -1))  # (B, Qa, H)
    return h + gated_mlp(layer.mlp, layer.post_attention_layernorm(h))  # (B, Qa, H)

"""Runs the draft head over its own KV cache: catching up on accepted tokens, then growing trees.

Draft cache layout per slot: position i holds the pair (f_i, x_{i+1}) for every settled position i
of the sequence (so it is as long as the target's cache), then, during tree growth, one entry per
tree node: level d (1-based) occupies positions n + (d-1)K .. n + dK - 1, where n is the settled
length. Tree entries are overwritten by the next catch-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.rollout.engine.kv_cache import KVCache
from fastgrpo.rollout.engine.model_runner import ForwardBatch, attention_mask, decoder_layer
from fastgrpo.rollout.speculative.draft import DraftHead
from fastgrpo.rollout.speculative.tree import DraftTree, expand_level, select_tree


@dataclass(frozen=True)
class TreeShape:
    """Width K (children per node, nodes expanded per level), depth L, N_verify (nodes incl. root).

    The candidate pool holds K nodes at depth 1 and K*K at every deeper level; the best
    N_verify - 1 of them by cumulative draft log-prob are verified.
    """

    width: int
    depth: int
    n_verify: int

    def __post_init__(self):
        if not (self.width >= 1 and self.depth >= 1 and 2 <= self.n_verify <= self.pool_size + 1):
            raise ValueError(f"{self}: need K, L >= 1 and 2 <= N_verify <= K + (L-1)K^2 + 1 = {self.pool_size + 1}")

    @property
    def pool_size(self) -> int:
        return self.width + (self.depth - 1) * self.width * self.width


class Drafter:
    def __init__(self, head: DraftHead, num_slots: int, max_len: int):
        cfg = head.config
        self.head = head.eval()
        self.head_dim = head.head_dim
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        param = next(head.parameters())
        self.cache = KVCache(1, num_slots, kv_heads, max_len, self.head_dim, param.dtype, param.device)

    def _layer(self, batch: ForwardBatch, x: torch.Tensor) -> torch.Tensor:
        """The head's decoder layer over fused inputs x (B, Q, H) -> predicted features (B, Q, H)."""
        Q = batch.tokens.shape[1]
        key_len = int(batch.starts.max()) + Q
        cos, sin = self.head.rotary(x, batch.positions)  # (B, Q, D)
        mask = attention_mask(batch, key_len)  # (B, 1, Q, T)
        write_pos = batch.starts[:, None] + torch.arange(Q, device=x.device)[None, :]  # (B, Q)
        return decoder_layer(self.head.layer, x, cos[:, None], sin[:, None], mask, self.cache, 0, batch.slots,
                             write_pos, key_len, self.head_dim)

    @torch.inference_mode()
    def catch_up(self, slots: torch.Tensor, starts: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Feeds the pairs (features[b, i], tokens[b, i]) at positions starts[b] + i, i < counts[b].

        tokens (B, P) are the next tokens x_{i+1}, features (B, P, H) the target's f_i, right-padded.
        Returns the predicted feature after each row's last pair (B, H): the root's feature.
        """
        B, P = tokens.shape
        positions = starts[:, None] + torch.arange(P, device=tokens.device)[None, :]  # (B, P)
        batch = ForwardBatch(tokens, positions, slots, starts)
        out = self._layer(batch, self.head.fuse(tokens, features))  # (B, P, H)
        return out[torch.arange(B, device=out.device), counts - 1]  # (B, H)

    @torch.inference_mode()
    def grow(self, slots: torch.Tensor, settled: torch.Tensor, root: torch.Tensor, root_feature: torch.Tensor,
             shape: TreeShape) -> DraftTree:
        """Builds one tree per sequence under `root` (B,) whose predicted feature is root_feature (B, H).

        settled (B,) = tokens in the caches; the root sits at position settled, depth-d nodes at
        settled + d.
        """
        K, L = shape.width, shape.depth
        B = root.shape[0]
        dev = root.device
        logp = torch.log_softmax(self.head.logits(root_feature), -1)  # (B, V)
        scores, tokens = logp.topk(K, dim=-1)  # (B, K) level 1
        parent_feat = root_feature[:, None, :].expand(B, K, root_feature.shape[-1])  # (B, K, H)
        level_index = torch.arange(K, device=dev).expand(B, K)  # (B, K) pool index of each level node
        cand_tokens, cand_scores = [tokens], [scores]
        cand_parents = [torch.full((B, K), -1, dtype=torch.long, device=dev)]
        cand_depths = [torch.ones(B, K, dtype=torch.long, device=dev)]
        pool = K
        region = torch.eye(K, dtype=torch.bool, device=dev).expand(B, K, K)  # (B, K, dK) ancestors of level d
        for d in range(1, L):
            batch = ForwardBatch(
                tokens,
                (settled + d - 1)[:, None].expand(B, K),  # rotary position of a depth-d node's pair
                slots,
                settled + (d - 1) * K,
                region,
                settled,
            )
            feat = self._layer(batch, self.head.fuse(tokens, parent_feat))  # (B, K, H)
            child_logp = torch.log_softmax(self.head.logits(feat), -1)  # (B, K, V)
            ex = expand_level(scores, child_logp, K)
            cand_tokens.append(ex.tokens)
            cand_scores.append(ex.scores)
            cand_parents.append(level_index.gather(1, ex.parent_slot))
            cand_depths.append(torch.full_like(ex.tokens, d + 1))
            # the next level: the K best children, expanded in the next iteration
            parent_slot = ex.parent_slot.gather(1, ex.keep)  # (B, K)
            tokens, scores = ex.tokens.gather(1, ex.keep), ex.scores.gather(1, ex.keep)  # (B, K)
            level_index = pool + ex.keep  # (B, K)
            pool += ex.tokens.shape[1]
            parent_feat = feat.gather(1, parent_slot[:, :, None].expand(B, K, feat.shape[-1]))  # (B, K, H)
            inherited = region.gather(1, parent_slot[:, :, None].expand(B, K, region.shape[-1]))  # (B, K, dK)
            region = torch.cat([inherited, torch.eye(K, dtype=torch.bool, device=dev).expand(B, K, K)], dim=2)
        return select_tree(
            root,
            torch.cat(cand_tokens, 1),
            torch.cat(cand_parents, 1),
            torch.cat(cand_scores, 1),
            torch.cat(cand_depths, 1),
            shape.n_verify,
        )

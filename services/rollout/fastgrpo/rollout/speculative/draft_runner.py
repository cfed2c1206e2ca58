"""Runs the draft head over its own KV cache: catching up on accepted tokens, then growing trees.

The draft cache is paged like the target's and uses the same block ids and tables (runtime.blocks):
one layer more in each block, sized into the same budget. Position i of a sequence holds the pair (f_i, x_{i+1}) for every settled position i
of the sequence (so it is as long as the target's cache), then, during tree growth, one entry per
node the tree expands: the E nodes expanded at level d (1-based) occupy positions n + (d-1)E ..
n + dE - 1, where n is the settled length (E = K for deterministic trees). Tree entries are
overwritten by the next catch-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.kv_cache import PagedKVCache
from fastgrpo.rollout.runtime.layers import decoder_layer, paged_inputs
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.tree import (DraftTree, TextChain, TreeShape, attach_chain, expand_level, merge_chain,
                                               pick_children, reach_scores, select_tree)


@dataclass(frozen=True)
class ChildDraw:
    """How a sampled tree draws its children, per sequence: from the draft's distribution under the
    sequence's own sampling parameters (so q is shaped like the target's p), without replacement.
    Greedy rows take the draft's top-k instead."""

    params: sampler.SamplingBatch  # (B,) rows
    uniforms: torch.Tensor  # (B, L', E, k) float64 U(0, 1), each sequence's own noise
    truncate: bool  # whether any row has top-k or top-p (sampler.truncates)


@dataclass(frozen=True)
class GrownTree:
    tree: DraftTree
    # (B, N, V) the draft distribution each node's children were drawn from (rows of nodes without
    # children are unused); None for deterministic trees
    draft_logq: torch.Tensor | None = None
    candidate: torch.Tensor | None = None  # (B, N) bool: a real draw (False: a draw past q's support)
    # (B, N) long: the child each node tests first, a text chain's token (tree.attach_chain); -1 none.
    # None where no chain joined a tree of drawn children
    lead: torch.Tensor | None = None


class Drafter:
    """The draft head over its cache. catch_up and grow are traced into compiled steps, so they
    set no autograd mode of their own: run them under torch.inference_mode (SpecDecoder.step does)."""

    def __init__(self, head: DraftHead):
        cfg = head.config
        self.head = head.eval()
        self.head_dim = head.head_dim
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache: PagedKVCache | None = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        return PagedKVCache.bytes_per_block(1, block_size, self.kv_heads, self.head_dim, next(self.head.parameters()).dtype)

    def allocate_cache(self, num_blocks: int, block_size: int, backend: str = "gather") -> PagedKVCache:
        """(Re)allocates the draft's cache: the same block ids as the target's, one layer each."""
        param = next(self.head.parameters())
        self.cache = None
        self.cache = PagedKVCache(1, num_blocks, block_size, self.kv_heads, self.head_dim, param.dtype, param.device,
                                  backend)
        return self.cache

    def _layer(self, batch: ForwardBatch, x: torch.Tensor, query_at: torch.Tensor | None = None) -> torch.Tensor:
        """The head's decoder layer over fused inputs x (B, Q, H) -> predicted features (B, Q, H);
        with query_at (B,), only the feature after input query_at[b] of each row: (B, 1, H)."""
        cos, sin = self.head.rotary(x, batch.positions)  # (B, Q, D)
        table, write_slots, mask = paged_inputs(batch, self.cache.block_size)
        return decoder_layer(self.head.layer, x, cos[:, None], sin[:, None], mask, self.cache, 0, write_slots,
                             table, self.head_dim, query_at)

    def catch_up(self, table: torch.Tensor, starts: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Feeds the pairs (features[b, i], tokens[b, i]) at positions starts[b] + i, i < counts[b].

        tokens (B, P) are the next tokens x_{i+1}, features (B, P, H) the target's f_i, right-padded.
        Returns the predicted feature after each row's last pair (B, H): the root's feature.
        """
        P = tokens.shape[1]
        positions = starts[:, None] + torch.arange(P, device=tokens.device)[None, :]  # (B, P)
        batch = ForwardBatch(tokens, positions, table, starts, key_blocks=table.shape[1])
        # every pair's keys and values enter the cache; only the last pair's output is computed
        return self._layer(batch, self.head.fuse(tokens, features), query_at=counts - 1)[:, 0]  # (B, H)

    def _child_logq(self, feat: torch.Tensor, draw: ChildDraw | None) -> torch.Tensor:
        """Predicted features (B, E, H) -> the draft distribution of each node's children (B, E, V)."""
        logits = self.head.logits(feat)  # (B, E, V)
        if draw is None:
            return torch.log_softmax(logits, -1)  # (B, E, V)
        B, E, V = logits.shape
        shaped = sampler.sampling_logprobs(logits.reshape(B * E, V), draw.params.repeat_rows(E),
                                           draw.truncate).view(B, E, V)
        # greedy rows rank their top-k children by the untruncated draft distribution
        return torch.where(draw.params.greedy[:, None, None], torch.log_softmax(logits, -1), shaped)

    def grow(self, table: torch.Tensor, settled: torch.Tensor, root: torch.Tensor, root_feature: torch.Tensor,
             shape: TreeShape, draw: ChildDraw | None = None, chain: TextChain | None = None) -> GrownTree:
        """Builds one tree per sequence under `root` (B,) whose predicted feature is root_feature (B, H).

        settled (B,) = tokens in the caches; the root sits at position settled, depth-d nodes at
        settled + d. Without `draw`: EAGLE-2's deterministic tree (top-K children, the best
        N_verify - 1 of the pool kept). With it: children drawn without replacement, all kept
        (shape.sampled_layout), and the distributions they were drawn from returned for verification.
        chain: a text chain per sequence. In a deterministic tree it competes with the head's
        candidates for the N_verify - 1 places (tree.merge_chain); in a tree of drawn children it
        is each chain node's parent's lead child, its new nodes beyond the drawn ones
        (tree.attach_chain). Either way the tree may then be deeper than L.
        """
        if draw is None:
            k, E, L = shape.width, shape.width, shape.depth
        else:
            k, E, L = shape.sampled_layout()
        B, H = root_feature.shape
        dev = root.device
        sampled = None if draw is None else ~draw.params.greedy  # (B,)

        def children(logq: torch.Tensor, level: int):  # (B, e, V) -> tokens, expansion scores (B, e, k)
            u = None if draw is None else draw.uniforms[:, level, : logq.shape[1]]
            tokens, lq = pick_children(logq, k, u, sampled)
            return tokens, reach_scores(lq, sampled)

        root_logq = self._child_logq(root_feature[:, None], draw)  # (B, 1, V)
        tokens, scores = children(root_logq, 0)
        tokens, scores = tokens[:, 0], scores[:, 0]  # (B, k) level 1
        parent_feat = root_feature[:, None, :].expand(B, k, H)  # (B, k, H) feature of each node's parent
        level_index = torch.arange(k, device=dev).expand(B, k)  # (B, k) pool index of each level node
        cand_tokens, cand_scores = [tokens], [scores]
        cand_parents = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
        cand_depths = [torch.ones(B, k, dtype=torch.long, device=dev)]
        drawn_from = [(torch.full((B, 1), -1, dtype=torch.long, device=dev), root_logq)]  # (pool index, log q)
        pool = k
        keep = scores.topk(min(E, k), dim=-1).indices  # (B, E) level-1 nodes expanded, best first
        region = None  # (B, E, dE) ancestors of the expanded nodes of level d among those forwarded
        for d in range(1, L):
            e = keep.shape[1]
            x_tok, x_score, x_index = tokens.gather(1, keep), scores.gather(1, keep), level_index.gather(1, keep)
            x_feat = parent_feat.gather(1, keep[:, :, None].expand(B, e, H))  # (B, e, H)
            eye = torch.eye(e, dtype=torch.bool, device=dev).expand(B, e, e)
            if region is None:
                region = eye
            else:
                inherited = region.gather(1, x_parent[:, :, None].expand(B, e, region.shape[-1]))  # (B, e, (d-1)e)
                region = torch.cat([inherited, eye], dim=2)
            batch = ForwardBatch(
                x_tok,
                (settled + d - 1)[:, None].expand(B, e),  # rotary position of a depth-d node's pair
                table,
                settled + (d - 1) * e,
                region,
                settled,
                key_blocks=table.shape[1],
            )
            feat = self._layer(batch, self.head.fuse(x_tok, x_feat))  # (B, e, H)
            logq = self._child_logq(feat, draw)  # (B, e, V)
            drawn_from.append((x_index, logq))
            ex = expand_level(x_score, *children(logq, d), n_expand=e)
            cand_tokens.append(ex.tokens)
            cand_scores.append(ex.scores)
            cand_parents.append(x_index.gather(1, ex.parent_slot))
            cand_depths.append(torch.full_like(ex.tokens, d + 1))
            tokens, scores, keep = ex.tokens, ex.scores, ex.keep
            level_index = pool + torch.arange(tokens.shape[1], device=dev).expand_as(tokens)  # (B, e*k)
            pool += tokens.shape[1]
            parent_feat = feat.gather(1, ex.parent_slot[:, :, None].expand(B, tokens.shape[1], H))  # (B, e*k, H)
            x_parent = ex.parent_slot.gather(1, keep)  # (B, e) level slot of each next node's parent
        all_tokens, all_parents = torch.cat(cand_tokens, 1), torch.cat(cand_parents, 1)
        all_scores, all_depths = torch.cat(cand_scores, 1), torch.cat(cand_depths, 1)
        if draw is None:
            if chain is None:
                return GrownTree(select_tree(root, all_tokens, all_parents, all_scores, all_depths, shape.n_verify, L))
            *pool, from_text = merge_chain(all_tokens, all_parents, all_scores, all_depths, chain)
            return GrownTree(select_tree(root, *pool, shape.n_verify, max(L, chain.tokens.shape[1]), from_text))
        # sampled: every candidate is a node (node = pool index + 1), in the order drawn
        tree = select_tree(root, all_tokens, all_parents, all_scores, all_depths, pool + 1, L)
        V = root_logq.shape[-1]
        node_logq = torch.zeros(B, pool + 1, V, dtype=root_logq.dtype, device=dev)  # (B, N, V)
        for index, logq in drawn_from:
            node_logq.scatter_(1, (index + 1)[:, :, None].expand(-1, -1, V), logq)
        candidate = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), all_scores > float("-inf")], 1)
        if chain is None:
            return GrownTree(tree, node_logq, candidate)
        C = chain.tokens.shape[1]
        tree, candidate, lead = attach_chain(tree, candidate, chain, max(L, C))
        node_logq = torch.cat([node_logq, node_logq.new_zeros(B, C, V)], 1)  # (a chain node's children: its lead only)
        return GrownTree(tree, node_logq, candidate, lead)

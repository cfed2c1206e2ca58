"""Draft trees as tensors, and the pure functions that build them.

A tree of one sequence has N nodes; node 0 is the root (the token the target emitted last, not yet
in its cache), every other node is a draft token whose parent has a smaller index (topological
order), so a depth-ordered sweep can follow parents. B sequences' trees share N and are stacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # (B, N) long; tokens[:, 0] = root
    parents: torch.Tensor  # (B, N) long; parents[:, 0] = 0 (the root is its own parent)
    depths: torch.Tensor  # (B, N) long; 0 at the root
    ancestors: torch.Tensor  # (B, N, N) bool; ancestors[b, i, j]: node j is i or an ancestor of i

    def __post_init__(self):
        B, N = self.tokens.shape
        assert self.parents.shape == self.depths.shape == (B, N) and self.ancestors.shape == (B, N, N)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """parents (B, N), parent index < own index, root = own parent -> (B, N, N) ancestor-or-self.

    anc[i] = {i} | anc[parent[i]]; max_depth sweeps propagate it down the deepest path.
    """
    B, N = parents.shape
    eye = torch.eye(N, dtype=torch.bool, device=parents.device).expand(B, N, N)  # (B, N, N)
    anc = eye.clone()
    for _ in range(max_depth):
        anc = eye | anc.gather(1, parents[:, :, None].expand(B, N, N))  # (B, N, N)
    return anc


def select_tree(
    root: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_depths: torch.Tensor,
    n_nodes: int,
) -> DraftTree:
    """Keeps the n_nodes - 1 best candidates (by cumulative draft log-prob) under the root.

    root (B,), cand_* (B, M) in topological order; cand_parents index the candidates, -1 = root.
    A child's cumulative log-prob never exceeds its parent's, and a stable sort puts the parent
    (lower index) first on ties, so the kept set is closed under taking ancestors.
    """
    B, M = cand_tokens.shape
    k = n_nodes - 1
    assert 0 < k <= M, (n_nodes, M)
    order = torch.sort(-cand_scores, dim=1, stable=True).indices[:, :k]  # (B, k) best first
    keep = torch.sort(order, dim=1).values  # (B, k) back in topological order
    new_index = torch.full((B, M), -1, dtype=torch.long, device=root.device)  # (B, M) candidate -> node
    new_index.scatter_(1, keep, torch.arange(1, k + 1, device=root.device).expand(B, k))
    par = cand_parents.gather(1, keep)  # (B, k) candidate index of the parent, -1 = root
    par_node = torch.where(par < 0, torch.zeros_like(par), new_index.gather(1, par.clamp(min=0)))  # (B, k)
    assert bool((par_node >= 0).all()), "selected set is not closed under ancestors"
    zero = torch.zeros(B, 1, dtype=torch.long, device=root.device)
    tokens = torch.cat([root[:, None], cand_tokens.gather(1, keep)], dim=1)  # (B, N)
    parents = torch.cat([zero, par_node], dim=1)  # (B, N)
    depths = torch.cat([zero, cand_depths.gather(1, keep)], dim=1)  # (B, N)
    max_depth = int(cand_depths.max()) if M else 0
    return DraftTree(tokens, parents, depths, ancestor_mask(parents, max_depth))


@dataclass(frozen=True)
class Expansion:
    """Every child proposed by one level, and which of them form the next level."""

    tokens: torch.Tensor  # (B, K*W) child tokens, W children per node
    parent_slot: torch.Tensor  # (B, K*W) index of the parent within the level
    scores: torch.Tensor  # (B, K*W) cumulative draft log-probs
    keep: torch.Tensor  # (B, W) indices (into the K*W children) of the next level, best first


def expand_level(level_scores: torch.Tensor, child_logp: torch.Tensor, width: int) -> Expansion:
    """EAGLE-2 expansion: every node of a level proposes its top-`width` children, all of which
    become candidates for verification; the `width` best by cumulative log-prob are expanded next.

    level_scores (B, K) cumulative log-probs, child_logp (B, K, V) draft log-probs of each node's
    next token.
    """
    B, K, V = child_logp.shape
    top_lp, top_tok = child_logp.topk(width, dim=-1)  # (B, K, W)
    cum = (level_scores[:, :, None] + top_lp).reshape(B, K * width)  # (B, K*W)
    parent = torch.arange(K, device=cum.device).repeat_interleave(width).expand(B, K * width)  # (B, K*W)
    keep = cum.topk(width, dim=-1).indices  # (B, W)
    return Expansion(top_tok.reshape(B, K * width), parent, cum, keep)

"""Draft trees: their shape (K, L, N_verify), the tree itself as tensors, and the pure functions
that build it.

A tree of one sequence has N nodes; node 0 is the root (the token the target emitted last, not yet
in its cache), every other node is a draft token whose parent has a smaller index (topological
order), so a depth-ordered sweep can follow parents. B sequences' trees share N and are stacked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgrpo.rollout.runtime.sampler import sample_inverse_cdf


@dataclass(frozen=True)
class TreeShape:
    """Width K (children per node, nodes expanded per level), depth L, N_verify (nodes incl. root).

    Deterministic (top-K) trees: the candidate pool holds K nodes at depth 1 and K*K at every
    deeper level; the best N_verify - 1 of them by cumulative draft log-prob are verified.
    Sampled trees (see `sampled_layout`) keep every child they draw.
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

    def sampled_layout(self) -> tuple[int, int, int]:
        """(k, E, L') of a sampled tree within N_verify: k children per expanded node, E nodes
        expanded per level below the root, L' levels, so that k + (L'-1) E k <= N_verify - 1.

        Recursive rejection sampling needs every drawn child of a node (dropping a child because
        of its own draft score would bias acceptance), so the budget is met by choosing how many
        nodes to expand rather than which children to keep. Depth comes first: the first drawn
        child is accepted whenever the draft agrees with the target, so a further level adds far
        more than a further sibling; width takes what L levels leave.
        """
        budget = self.n_verify - 1
        depth = min(self.depth, budget)
        k = max(1, min(self.width, budget // depth))
        if depth == 1:
            return k, 1, 1
        per_level = (budget - k) // (depth - 1)  # nodes each deeper level may add
        expand = min(max(per_level // k, 1), k)
        return k, expand, min(depth, 1 + (budget - k) // (expand * k))


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # (B, N) long; tokens[:, 0] = root
    parents: torch.Tensor  # (B, N) long; parents[:, 0] = 0 (the root is its own parent)
    depths: torch.Tensor  # (B, N) long; 0 at the root
    ancestors: torch.Tensor  # (B, N, N) bool; ancestors[b, i, j]: node j is i or an ancestor of i
    from_text: torch.Tensor | None = None  # (B, N) bool: nodes a text chain put there (merge_chain)

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
    max_depth: int,
    from_text: torch.Tensor | None = None,
) -> DraftTree:
    """Keeps the n_nodes - 1 best candidates (by cumulative draft log-prob) under the root.

    root (B,), cand_* (B, M) in topological order; cand_parents index the candidates, -1 = root;
    max_depth: the deepest candidate's depth at most (the levels grown: a host-side fact);
    from_text (B, M) bool: candidates a text chain scored (merge_chain), carried to the kept nodes.
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
    zero = torch.zeros(B, 1, dtype=torch.long, device=root.device)
    tokens = torch.cat([root[:, None], cand_tokens.gather(1, keep)], dim=1)  # (B, N)
    parents = torch.cat([zero, par_node], dim=1)  # (B, N)
    depths = torch.cat([zero, cand_depths.gather(1, keep)], dim=1)  # (B, N)
    marks = None
    if from_text is not None:
        marks = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=root.device), from_text.gather(1, keep)], 1)
    return DraftTree(tokens, parents, depths, ancestor_mask(parents, max_depth), marks)


def draw_without_replacement(logq: torch.Tensor, k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """k distinct tokens per row drawn one after another from exp(logq), each from what the earlier
    draws left (renormalised), by inverse CDF: the order is the sampling order, which recursive
    rejection sampling needs. logq (..., V), uniforms (..., k) -> (..., k) tokens; once a row's
    support is exhausted the remaining draws repeat the last token with q = 0 (callers mask them).
    """
    probs = logq.double().exp()  # (..., V)
    out = []
    for i in range(k):
        tok = sample_inverse_cdf(probs, uniforms[..., i])[..., None]  # (..., 1)
        if i:  # an exhausted row (all mass drawn: the only draw of probability 0) keeps its previous token
            tok = torch.where(probs.gather(-1, tok) > 0, tok, out[-1])
        out.append(tok)
        probs = probs.scatter(-1, tok, 0.0)
    return torch.cat(out, dim=-1)  # (..., k)


def pick_children(logq: torch.Tensor, k: int, uniforms: torch.Tensor | None = None,
                  sampled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k children of each node from its draft distribution: the top-k (deterministic), or, on rows
    where `sampled` is set, k draws without replacement in sampling order.

    logq (B, E, V) draft log-probs, uniforms (B, E, k), sampled (B,) bool -> tokens (B, E, k) and
    their draft log-probs (B, E, k); a draw past the support of q has log-prob -inf.
    sampled None: every row takes the top-k (a tree grown without draws).
    """
    top_lq, top_tok = logq.topk(k, dim=-1)  # (B, E, k)
    if sampled is None:
        return top_tok, top_lq
    drawn = draw_without_replacement(logq, k, uniforms)  # (B, E, k)
    # a repeated (exhausted) draw is no candidate: give it q = 0
    repeat = torch.zeros_like(drawn, dtype=torch.bool)
    repeat[..., 1:] = drawn[..., 1:] == drawn[..., :-1]
    drawn_lq = logq.gather(-1, drawn).masked_fill(repeat, float("-inf"))  # (B, E, k)
    use = sampled[:, None, None]
    return torch.where(use, drawn, top_tok), torch.where(use, drawn_lq, top_lq)


def reach_scores(child_logq: torch.Tensor, sampled: torch.Tensor | None, accept: float = 0.8) -> torch.Tensor:
    """Log-scores that rank children for expansion. Deterministic children: their draft log-prob.
    Drawn children (rows where `sampled` is set): the chance that recursive rejection sampling
    reaches child i, accept * (1 - accept)^i if each test passes with probability `accept` --
    the first draw is accepted whenever the draft matches the target, later ones only when the
    draws before them were rejected, whatever their own q. Draws past q's support stay -inf.

    child_logq (B, E, k), sampled (B,) -> (B, E, k).
    """
    if sampled is None:
        return child_logq
    k = child_logq.shape[-1]
    i = torch.arange(k, device=child_logq.device, dtype=child_logq.dtype)  # (k,)
    reach = (math.log(accept) + i * math.log(1 - accept)).expand_as(child_logq)  # (B, E, k)
    reach = reach.masked_fill(child_logq == float("-inf"), float("-inf"))
    return torch.where(sampled[:, None, None], reach, child_logq)


@dataclass(frozen=True)
class Expansion:
    """Every child proposed by one level, and which of them are expanded at the next."""

    tokens: torch.Tensor  # (B, E*k) child tokens, k children per node
    parent_slot: torch.Tensor  # (B, E*k) index of the parent within the level
    scores: torch.Tensor  # (B, E*k) cumulative draft log-probs (-inf: not a candidate)
    keep: torch.Tensor  # (B, n) indices (into the E*k children) expanded next, best first


def expand_level(level_scores: torch.Tensor, child_tokens: torch.Tensor, child_logq: torch.Tensor,
                 n_expand: int) -> Expansion:
    """EAGLE-2 expansion: every node of a level proposes its children, all of which become
    candidates for verification; the `n_expand` best by cumulative log-prob are expanded next.

    level_scores (B, E) cumulative log-probs, child_tokens / child_logq (B, E, k) each node's
    children and their draft log-probs (from pick_children).
    """
    B, E, k = child_tokens.shape
    cum = (level_scores[:, :, None] + child_logq).reshape(B, E * k)  # (B, E*k)
    parent = torch.arange(E, device=cum.device).repeat_interleave(k).expand(B, E * k)  # (B, E*k)
    keep = cum.topk(n_expand, dim=-1).indices  # (B, n)
    return Expansion(child_tokens.reshape(B, E * k), parent, cum, keep)


def children_table(parents: torch.Tensor, candidate: torch.Tensor, max_children: int) -> torch.Tensor:
    """Each node's children in index order (the order they were drawn in): (B, N, C) node
    indices, -1 past the last. parents (B, N); candidate (B, N) bool, False drops a node;
    max_children C: the most children a node has (the tree's width: a host-side fact)."""
    B, N = parents.shape
    C = max_children
    idx = torch.arange(N, device=parents.device)
    is_child = (parents[:, None, :] == idx[None, :, None]) & (idx > 0) & candidate[:, None, :]  # (B, N, N)
    rank = is_child.long().cumsum(-1) - 1  # (B, N, N) position of child j among node i's children
    # every non-child (and, were C too small, a child past it) goes to a column C that is dropped
    column = torch.where(is_child, rank.clamp(max=C), torch.full_like(rank, C))  # (B, N, N)
    table = torch.full((B, N, C + 1), -1, dtype=torch.long, device=parents.device)
    table.scatter_(2, column, torch.where(is_child, idx, -1).expand(B, N, N))
    return table[:, :, :C]


@dataclass(frozen=True)
class TextChain:
    """Each sequence's proposal from generated text (speculative.text_drafts): a chain of C tokens
    to follow the root, and the log of each one's cumulative estimated acceptance (non-increasing
    along the chain; -inf past a row's proposal)."""

    tokens: torch.Tensor  # (B, C) long
    log_reach: torch.Tensor  # (B, C) float32

    @property
    def valid(self) -> torch.Tensor:
        return self.log_reach > float("-inf")  # (B, C)


def merge_chain(cand_tokens: torch.Tensor, cand_parents: torch.Tensor, cand_scores: torch.Tensor,
                cand_depths: torch.Tensor, chain: TextChain) -> tuple[torch.Tensor, ...]:
    """Adds a text chain to a deterministic tree's candidate pool, so that `select_tree` keeps the
    best of both by estimated acceptance (the head's cumulative draft log-prob, the chain's log
    reach). Where the chain repeats a path the pool holds, the pool's node takes the better score
    and the chain goes on under it: siblings stay distinct, which exact matching needs.

    cand_* (B, M) as select_tree takes them -> the pool (B, M + C) in the same form, and a (B, M + C)
    bool marking nodes that only the chain proposed or that it scored higher than the head did.
    """
    B, M = cand_tokens.shape
    C = chain.tokens.shape[1]
    dev = cand_tokens.device
    valid = chain.valid  # (B, C)
    parent = torch.full((B,), -1, dtype=torch.long, device=dev)  # (B,) pool index the next chain node hangs under
    alive = torch.ones(B, dtype=torch.bool, device=dev)  # (B,) the chain so far repeats pool paths
    scores = cand_scores.clone()
    from_text = torch.zeros(B, M + C, dtype=torch.bool, device=dev)
    chain_parents, chain_scores = [], []
    for j in range(C):
        chain_parents.append(parent)
        hit = ((cand_depths == j + 1) & (cand_tokens == chain.tokens[:, j: j + 1])
               & (cand_parents == parent[:, None]))  # (B, M) at most one: siblings are distinct
        found = alive & valid[:, j] & hit.any(1)  # (B,)
        at = hit.long().argmax(1)  # (B,)
        held = scores.gather(1, at[:, None])[:, 0]  # (B,) the pool node's own score
        better = found & (chain.log_reach[:, j] > held)
        scores.scatter_(1, at[:, None], torch.where(better, chain.log_reach[:, j].to(held.dtype), held)[:, None])
        from_text.scatter_(1, at[:, None], (better | from_text.gather(1, at[:, None])[:, 0])[:, None])
        chain_scores.append(torch.where(found, torch.full_like(chain.log_reach[:, j], float("-inf")), chain.log_reach[:, j]))
        alive = found
        parent = torch.where(found, at, torch.full_like(at, M + j))
    from_text[:, M:] = valid
    tokens = torch.cat([cand_tokens, chain.tokens], 1)  # (B, M + C)
    parents = torch.cat([cand_parents, torch.stack(chain_parents, 1)], 1)
    scores = torch.cat([scores, torch.stack(chain_scores, 1).to(scores.dtype)], 1)
    depths = torch.cat([cand_depths, torch.arange(1, C + 1, device=dev).expand(B, C)], 1)
    return tokens, parents, scores, depths, from_text



def attach_chain(tree: DraftTree, candidate: torch.Tensor, chain: TextChain,
                 max_depth: int) -> tuple[DraftTree, torch.Tensor, torch.Tensor]:
    """Adds a text chain to a tree of drawn children (recursive rejection sampling) as every chain
    node's parent's *lead*: the child that node tests first, as a proposal with q = its point
    mass (verify.verify_rrs). Where the chain repeats a drawn child, that child is the lead and
    the chain goes on under it (its drawn children stay); from its first token that no drawn child
    carries, the chain's nodes are new, each the only child of the one before.

    tree (B, N), candidate (B, N) (the drawn children that are real draws), chain (B, C); max_depth:
    the deepest node at most, chains included. Returns the tree (B, N + C) with from_text marking
    the new nodes, candidate (B, N + C) (new nodes are no drawn children: False) and lead (B, N + C)
    long: each node's lead child, -1 where it has none. Chain slots not used (past a row's
    proposal, or repeating a drawn child) become padding: token 0 under the root, no one's lead.
    """
    B, N = tree.tokens.shape
    C = chain.tokens.shape[1]
    dev = tree.tokens.device
    valid = chain.valid  # (B, C)
    lead = torch.full((B, N + C), -1, dtype=torch.long, device=dev)
    at = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) the node the next chain token hangs under
    drawn = torch.ones(B, dtype=torch.bool, device=dev)  # (B,) the chain so far repeats drawn children
    new_parents, new_real = [], []
    for j in range(C):
        hit = (drawn[:, None] & candidate & (tree.depths == j + 1) & (tree.parents == at[:, None])
               & (tree.tokens == chain.tokens[:, j: j + 1]))  # (B, N) at most one: draws are distinct
        found = valid[:, j] & hit.any(1)  # (B,)
        node = torch.where(found, hit.long().argmax(1), torch.full_like(at, N + j))  # (B,)
        lead.scatter_(1, at[:, None], torch.where(valid[:, j], node, lead.gather(1, at[:, None])[:, 0])[:, None])
        real = valid[:, j] & ~found  # (B,) slot N + j is a new node
        new_parents.append(torch.where(real, at, torch.zeros_like(at)))
        new_real.append(real)
        drawn = found
        at = torch.where(valid[:, j], node, at)
    real = torch.stack(new_real, 1)  # (B, C)
    parents = torch.cat([tree.parents, torch.stack(new_parents, 1)], 1)  # (B, N + C)
    chain_depths = torch.arange(1, C + 1, device=dev).expand(B, C)
    depths = torch.cat([tree.depths, torch.where(real, chain_depths, torch.ones_like(chain_depths))], 1)
    tokens = torch.cat([tree.tokens, torch.where(real, chain.tokens, torch.zeros_like(chain.tokens))], 1)
    from_text = torch.cat([torch.zeros(B, N, dtype=torch.bool, device=dev), real], 1)
    out = DraftTree(tokens, parents, depths, ancestor_mask(parents, max_depth), from_text)
    return out, torch.cat([candidate, torch.zeros(B, C, dtype=torch.bool, device=dev)], 1), lead


def chain_tree(root: torch.Tensor, chain: TextChain) -> DraftTree:
    """A tree that is each row's chain alone (drafting from text without a draft head): root (B,),
    chain (B, C) -> N = C + 1 nodes in a line; from_text marks the chain's real nodes (a row's
    padding past its proposal must never be accepted: verification takes from_text | root as its
    candidates)."""
    B, C = chain.tokens.shape
    dev = root.device
    parents = torch.arange(-1, C, device=dev).clamp(min=0).expand(B, C + 1)  # (B, N): node i's parent is i - 1
    depths = torch.arange(C + 1, device=dev).expand(B, C + 1)  # (B, N)
    tokens = torch.cat([root[:, None], chain.tokens], 1)  # (B, N)
    from_text = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), chain.valid], 1)
    return DraftTree(tokens, parents, depths, ancestor_mask(parents, C), from_text)

"""Lossless tree verification.

The target scores every tree node in one forward; logits at node i give the target's distribution
of the token after node i. Both rules below walk down from the root: at a node, a *target token* t
is drawn from the target's distribution there; if a child carries t, the walk moves to it (that
draft token is accepted), otherwise t is emitted as the bonus token and the walk stops.

  * greedy: t = argmax — the emitted tokens are exactly plain greedy decoding's;
  * sample-matching: t ~ p, the target's sampling distribution (temperature, top-k, top-p) — each
    emitted token is an exact sample from p given its prefix, so the output is distributed as plain
    sampling. This is the exact rule for children chosen deterministically (top-K of the draft);
    P(accept at a node) = sum of p over its children.

A third rule, for trees whose children were *drawn* from the draft's distribution q (without
replacement, in order c_1, c_2, ...):

  * recursive rejection sampling (RRS): at a node, child c_i is accepted with probability
    min(1, p_i(c_i) / q_i(c_i)); on rejection the target becomes the residual
    p_{i+1} = norm(max(p_i - q_i, 0)) and the proposal q_{i+1} = q_i without c_i, renormalised.
    When every child is rejected, a token drawn from the last residual is the bonus. Each round is
    one step of speculative sampling against the current residual, so the emitted token is an exact
    sample from p; with q close to p it accepts about sum min(p, q) per child, where matching a
    deterministic child accepts only its p. Applied to top-K children this test is biased; greedy
    rows (p one-hot) reduce it to exact matching whatever q is.

Drawing t at every node up front (one uniform per node, from the sequence's own noise: sampler.counter_uniforms) is
equivalent to drawing it lazily along the walk: nodes off the walk never influence the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.rollout.runtime.sampler import sample_inverse_cdf
from fastgrpo.rollout.speculative.tree import DraftTree, children_table

VERIFY_RULES = ("rrs", "match")  # how sampled sequences verify (see the module docstring)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome per sequence. Entries past n_emitted are padding (repeat the last valid one)."""

    accepted: torch.Tensor  # (B,) long, draft tokens accepted (0..max depth)
    path: torch.Tensor  # (B, D+1) long, node indices root, a_1 .. a_m (the nodes whose logits emit)
    tokens: torch.Tensor  # (B, D+1) long, emitted tokens a_1 .. a_m, then the bonus token
    led: torch.Tensor | None = None  # (B,) long, accepted nodes that passed as a lead child (verify_rrs)

    @property
    def n_emitted(self) -> torch.Tensor:
        return self.accepted + 1  # (B,)


def accept_path(tree: DraftTree, target_tokens: torch.Tensor, max_depth: int,
                candidate: torch.Tensor | None = None) -> VerifyResult:
    """Walks the tree against the target token drawn at every node. target_tokens (B, N);
    max_depth D: no node is deeper (a host-side fact: the results are D + 1 wide whatever the
    trees hold); candidate (B, N) bool: False for padding nodes, never accepted (None: all real)."""
    B, N = tree.tokens.shape
    parent_target = target_tokens.gather(1, tree.parents)  # (B, N) token the target drew at the parent
    match = tree.tokens == parent_target  # (B, N)
    if candidate is not None:
        match &= candidate
    match[:, 0] = True  # the root is given
    # a node is accepted when it and every ancestor matched; siblings carry distinct tokens, so
    # the accepted nodes form one path from the root
    accepted_node = ~(tree.ancestors & ~match[:, None, :]).any(-1)  # (B, N)
    deepest = torch.where(accepted_node, tree.depths, torch.full_like(tree.depths, -1)).argmax(1)  # (B,)
    n_acc = tree.depths.gather(1, deepest[:, None])[:, 0]  # (B,)
    D = max_depth
    on_path = tree.ancestors[torch.arange(B, device=tree.tokens.device), deepest]  # (B, N)
    # nodes of the path sorted by depth: off-path nodes get a key past every depth
    key = torch.where(on_path, tree.depths, torch.full_like(tree.depths, N + D + 1))  # (B, N)
    path = key.argsort(dim=1, stable=True)[:, : D + 1]  # (B, D+1)
    valid = torch.arange(D + 1, device=path.device)[None, :] <= n_acc[:, None]  # (B, D+1)
    path = torch.where(valid, path, deepest[:, None].expand(B, D + 1))
    # token emitted at step k: the path's next node for k < m, the bonus drawn at the deepest for k = m
    nxt = torch.cat([path[:, 1:], path[:, -1:]], dim=1)  # (B, D+1)
    drafted = tree.tokens.gather(1, nxt)  # (B, D+1)
    bonus = target_tokens.gather(1, deepest[:, None]).expand(B, D + 1)  # (B, D+1)
    k = torch.arange(D + 1, device=path.device)[None, :]
    tokens = torch.where(k < n_acc[:, None], drafted, bonus)
    return VerifyResult(n_acc, path, tokens)


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor, max_depth: int,
                  candidate: torch.Tensor | None = None) -> VerifyResult:
    """Longest path whose tokens equal the target's argmax at their parent. target_logits (B, N, V)."""
    return accept_path(tree, target_logits.argmax(-1), max_depth, candidate)


def verify_sampled(tree: DraftTree, sampling_logp: torch.Tensor, uniforms: torch.Tensor, max_depth: int,
                   candidate: torch.Tensor | None = None) -> VerifyResult:
    """Sample-matching. sampling_logp (B, N, V): the target's sampling distribution at each node
    (sampler.sampling_logprobs); uniforms (B, N) i.i.d. U(0, 1), each sequence's own."""
    return accept_path(tree, sample_inverse_cdf(sampling_logp.double().exp(), uniforms), max_depth, candidate)


def verify_rrs(tree: DraftTree, sampling_logp: torch.Tensor, draft_logq: torch.Tensor, candidate: torch.Tensor,
               uniforms: torch.Tensor, max_depth: int, max_children: int,
               lead: torch.Tensor | None = None) -> VerifyResult:
    """Recursive rejection sampling down a tree of drawn children.

    sampling_logp (B, N, V) the target's sampling distribution at each node; draft_logq (B, N, V)
    the distribution each node's children were drawn from (without replacement, in index order);
    candidate (B, N) False for draws past q's support; uniforms (B, >= D+1, >= C+1) i.i.d. U[0, 1),
    D = max_depth the deepest node, C = max_children the most children of a node (host-side facts:
    the walk is D + 1 rounds of C tests, whoever stopped early): at each depth one uniform per
    child test and the last for the bonus.

    lead (B, N), optional: a child each node tests *first*, as a proposal with q = its point mass
    (a text chain's token: tree.attach_chain), -1 where a node has none; uniforms then need
    C + 2 per depth (the lead's test takes the one at C). It is accepted with probability p(x);
    on rejection the target becomes p zeroed at x and renormalised, the drawn children's q is
    left as it is, and they are tested against that residual as above (a drawn child carrying x,
    the lead itself where the chain repeats a draw, is then rejected surely). Each test is a round
    of speculative sampling against the current residual with the proposal the child really came
    from, so the emitted token is still an exact sample from p.
    """
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    D, C = max_depth, max_children
    kids = children_table(tree.parents, candidate, C)  # (B, N, C)
    need = C + 1 + (lead is not None)
    assert uniforms.shape[0] == B and uniforms.shape[1] >= D + 1 and uniforms.shape[2] >= need, uniforms.shape
    rows = torch.arange(B, device=dev)
    node = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) where each walk stands
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    path, emitted = [node], []
    led = torch.zeros_like(node)  # (B,) accepted as a lead child
    for depth in range(D + 1):
        p = sampling_logp[rows, node].double().exp()  # (B, V)
        q = draft_logq[rows, node].double().exp()  # (B, V)
        nxt = torch.full_like(node, -1)  # (B,) accepted child
        if lead is not None:
            first = lead[rows, node]  # (B,)
            live = ~done & (first >= 0)
            x = tree.tokens[rows, first.clamp(min=0)][:, None]  # (B, 1)
            accept = live & (uniforms[:, depth, C] < p.gather(1, x)[:, 0])  # q(x) = 1
            nxt = torch.where(accept, first, nxt)
            led += accept.long()
            rest = p.scatter(1, x, 0.0)
            mass = rest.sum(-1, keepdim=True)
            p = torch.where((live & ~accept)[:, None] & (mass > 0), rest / mass.clamp(min=1e-300), p)
        for i in range(C):
            child = kids[rows, node, i]  # (B,)
            live = ~done & (nxt < 0) & (child >= 0)
            x = tree.tokens[rows, child.clamp(min=0)][:, None]  # (B, 1)
            px, qx = p.gather(1, x)[:, 0], q.gather(1, x)[:, 0]
            accept = live & (uniforms[:, depth, i] * qx < px)  # u < p/q without dividing by q = 0
            nxt = torch.where(accept, child, nxt)
            reject = (live & ~accept)[:, None]
            residual = (p - q).clamp(min=0)  # (B, V)
            mass = residual.sum(-1, keepdim=True)
            # mass 0 means p == q, where a rejection has probability 0: keep p
            p = torch.where(reject & (mass > 0), residual / mass.clamp(min=1e-300), p)
            rest = q.scatter(1, x, 0.0)
            q = torch.where(reject, rest / rest.sum(-1, keepdim=True).clamp(min=1e-300), q)
        bonus = sample_inverse_cdf(p, uniforms[:, depth, -1])  # (B,) from the last residual
        stop = ~done & (nxt < 0)
        last = emitted[-1] if emitted else bonus
        emitted.append(torch.where(stop, bonus, torch.where(done, last, tree.tokens[rows, nxt.clamp(min=0)])))
        node = torch.where(done | stop, node, nxt)
        path.append(node)
        done = done | stop
    tokens = torch.stack(emitted, dim=1)  # (B, D+1)
    path_t = torch.stack(path[:-1], dim=1)  # (B, D+1): root, a_1 .. a_m, then padding
    accepted = tree.depths.gather(1, node[:, None])[:, 0]  # (B,)
    return VerifyResult(accepted, path_t, tokens, None if lead is None else led)

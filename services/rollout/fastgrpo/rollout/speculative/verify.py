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

Drawing t at every node up front (one uniform per node, from the sequence's own generator) is
equivalent to drawing it lazily along the walk: nodes off the walk never influence the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.rollout.speculative.tree import DraftTree


@dataclass(frozen=True)
class VerifyResult:
    """Outcome per sequence. Entries past n_emitted are padding (repeat the last valid one)."""

    accepted: torch.Tensor  # (B,) long, draft tokens accepted (0..max depth)
    path: torch.Tensor  # (B, D+1) long, node indices root, a_1 .. a_m (the nodes whose logits emit)
    tokens: torch.Tensor  # (B, D+1) long, emitted tokens a_1 .. a_m, then the bonus token

    @property
    def n_emitted(self) -> torch.Tensor:
        return self.accepted + 1  # (B,)


def accept_path(tree: DraftTree, target_tokens: torch.Tensor) -> VerifyResult:
    """Walks the tree against the target token drawn at every node. target_tokens (B, N)."""
    B, N = tree.tokens.shape
    parent_target = target_tokens.gather(1, tree.parents)  # (B, N) token the target drew at the parent
    match = tree.tokens == parent_target  # (B, N)
    match[:, 0] = True  # the root is given
    # a node is accepted when it and every ancestor matched; siblings carry distinct tokens, so
    # the accepted nodes form one path from the root
    accepted_node = ~(tree.ancestors & ~match[:, None, :]).any(-1)  # (B, N)
    deepest = torch.where(accepted_node, tree.depths, torch.full_like(tree.depths, -1)).argmax(1)  # (B,)
    n_acc = tree.depths.gather(1, deepest[:, None])[:, 0]  # (B,)
    D = int(tree.depths.max())
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


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> VerifyResult:
    """Longest path whose tokens equal the target's argmax at their parent. target_logits (B, N, V)."""
    return accept_path(tree, target_logits.argmax(-1))


def sample_inverse_cdf(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from the distribution exp(logp), by inverse CDF. logp (..., V), uniforms (...)."""
    probs = logp.double().exp()  # (..., V)
    cdf = probs.cumsum(-1)  # (..., V)
    target = uniforms.double()[..., None] * cdf[..., -1:]  # (..., 1)
    # the first index whose cdf exceeds u has positive probability (cdf only rises there)
    return torch.searchsorted(cdf, target, right=True).clamp(max=logp.shape[-1] - 1)[..., 0]


def verify_sampled(tree: DraftTree, sampling_logp: torch.Tensor, uniforms: torch.Tensor) -> VerifyResult:
    """Sample-matching. sampling_logp (B, N, V): the target's sampling distribution at each node
    (sampler.sampling_logprobs); uniforms (B, N) i.i.d. U[0, 1) from each sequence's generator."""
    return accept_path(tree, sample_inverse_cdf(sampling_logp, uniforms))

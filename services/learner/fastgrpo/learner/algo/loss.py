"""The clipped GRPO objective as small pure tensor functions.

Shapes: B completions (Q prompts x G samples), T completion tokens (right-padded), V vocabulary.
``mask`` is (B, T), True (or 1.0) on real completion tokens. The definitions follow TRL's
``GRPOTrainer`` (``_compute_loss``) on a single process:

    ratio      = exp(logp_new - logp_old)                                      (B, T)
    surrogate  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)   (B, T)
    kl (k3)    = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1          (B, T)
    per_token  = surrogate + beta * kl                                         (B, T)
    loss       = aggregate(per_token, mask, mode)                              ()

Nothing here syncs with the device: metrics come back as 0-dim tensors for the metrics layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossMode = Literal["grpo", "dr_grpo", "dapo"]
LOSS_MODES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")


def _check_token_tensor(name: str, x: Tensor, shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError unless ``x`` is a floating (B, T) tensor (of ``shape`` when given)."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")


def _check_mask(mask: Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``mask`` is a bool or floating tensor of ``shape``."""
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool or floating (0/1), got {mask.dtype}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token-level mean of ``x`` (B, T) over ``mask`` (float, same shape); 0 for an empty mask."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)  # ()


def per_token_surrogate(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """PPO/GRPO clipped surrogate loss per token (to be minimised).

    Args:
        logp_new: (B, T) log-probs of the sampled tokens under the policy being trained.
        logp_old: (B, T) log-probs under the policy that sampled them (treated as given; detach it
            if it carries a graph).
        advantages: (B,) one advantage per completion, shared by all its tokens.
        eps_low: lower clip width, ratio is clipped at 1 - eps_low (0 <= eps_low <= 1).
        eps_high: upper clip width, ratio is clipped at 1 + eps_high (DAPO's clip-higher: >= eps_low
            lets rare tokens with positive advantage grow further).

    Returns:
        (B, T) ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``. Its gradient w.r.t.
        ``logp_new`` is zero exactly where the clipped branch is the smaller one, i.e. ratio above
        1 + eps_high with A > 0 or below 1 - eps_low with A < 0.
    """
    _check_token_tensor("logp_new", logp_new)
    _check_token_tensor("logp_old", logp_old, tuple(logp_new.shape))
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected ({logp_new.shape[0]},)"
        )
    if not 0.0 <= eps_low <= 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got {eps_low}, {eps_high}")

    ratio = torch.exp(logp_new - logp_old)  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    adv = advantages[:, None].to(ratio.dtype)  # (B, 1)
    # The min makes the objective pessimistic: a step may not profit from pushing the ratio past
    # the trust region, but it still pays in full when the ratio moved the wrong way.
    return -torch.minimum(ratio * adv, clipped * adv)  # (B, T)


def kl_k3(logp_new: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(new || ref) from log-probs of tokens sampled from the policy.

    Args:
        logp_new: (B, T) log-probs under the policy being trained.
        logp_ref: (B, T) log-probs of the same tokens under the frozen reference policy.

    Returns:
        (B, T) ``exp(ref - new) - (ref - new) - 1``: unbiased for KL(new || ref), always >= 0, and
        lower variance than ``new - ref`` (Schulman, "Approximating KL divergence").
    """
    _check_token_tensor("logp_new", logp_new)
    _check_token_tensor("logp_ref", logp_ref, tuple(logp_new.shape))
    log_ratio = logp_ref - logp_new  # (B, T)
    return torch.exp(log_ratio) - log_ratio - 1.0  # (B, T)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: LossMode = "grpo",
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar, TRL-compatible.

    Args:
        per_token: (B, T) per-token loss.
        mask: (B, T) bool or 0/1 float, True on completion tokens (padding is excluded).
        mode:
            "grpo":    mean over sequences of (masked sum / that sequence's length); every
                       completion weighs the same, so tokens of long ones weigh less (length bias).
            "dr_grpo": masked sum / (B * max_completion_length); a constant normaliser removes
                       that bias (Dr. GRPO).
            "dapo":    masked sum / number of masked tokens in the batch; every token weighs the
                       same (DAPO token-level loss; TRL's "bnpo", and its "dapo" on one process).
        max_completion_length: the generation cap, used only by "dr_grpo" (defaults to T; must
            be >= T since no completion can be longer than the cap).

    Returns:
        () scalar. Sequence lengths and the token count are clamped to >= 1 as in TRL, so an
        all-padding row contributes 0 rather than NaN.
    """
    _check_token_tensor("per_token", per_token)
    shape = tuple(per_token.shape)
    _check_mask(mask, shape)
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    B, T = shape

    m = mask.to(per_token.dtype)  # (B, T)
    masked = per_token * m  # (B, T)
    if mode == "grpo":
        seq_len = m.sum(dim=1).clamp(min=1.0)  # (B,)
        return (masked.sum(dim=1) / seq_len).mean()  # ()
    if mode == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        if L < T:
            raise ValueError(f"max_completion_length {L} is shorter than the T={T} token columns")
        return masked.sum() / (B * L)  # ()
    return masked.sum() / m.sum().clamp(min=1.0)  # () dapo


@dataclass(frozen=True)
class GRPOLossOutput:
    """Result of ``grpo_loss``. ``loss`` carries the graph; every other field is detached.

    Attributes:
        loss: () scalar to call ``.backward()`` on.
        clip_fraction: () fraction of masked tokens whose clip is active (zero gradient):
            ratio < 1 - eps_low with A < 0, or ratio > 1 + eps_high with A > 0 (TRL's
            ``clip_ratio/region_mean``).
        clip_low_fraction: () the first of those two cases alone.
        clip_high_fraction: () the second of those two cases alone.
        kl_mean: () token-level masked mean of the k3 KL; 0 when beta == 0 (not computed).
        ratio_mean: () token-level masked mean of exp(logp_new - logp_old).
    """

    loss: Tensor
    clip_fraction: Tensor
    clip_low_fraction: Tensor
    clip_high_fraction: Tensor
    kl_mean: Tensor
    ratio_mean: Tensor


def grpo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    logp_ref: Tensor | None = None,
    mode: LossMode = "grpo",
    max_completion_length: int | None = None,
) -> GRPOLossOutput:
    """The clipped GRPO loss of one (micro-)batch: surrogate + beta * k3 KL, aggregated by mode.

    Args:
        logp_new: (B, T) log-probs of the completion tokens under the policy being trained.
        logp_old: (B, T) log-probs under the sampling policy (the rollout's); detached here.
        advantages: (B,) per-completion advantages (see ``group_advantages``).
        mask: (B, T) bool or 0/1 float, True on completion tokens.
        eps_low: lower clip width (0 <= eps_low <= 1).
        eps_high: upper clip width (>= 0).
        beta: KL coefficient (>= 0); 0 skips the KL term and needs no reference.
        logp_ref: (B, T) log-probs under the frozen reference policy; required when beta > 0,
            detached here.
        mode: aggregation, "grpo" | "dr_grpo" | "dapo" (see ``aggregate``).
        max_completion_length: generation cap for "dr_grpo" (defaults to T).

    Returns:
        GRPOLossOutput with the differentiable loss and detached token-level metrics.

    Raises:
        ValueError: on a bad mode, clip width, beta, a missing ``logp_ref`` or mismatched shapes.
    """
    _check_token_tensor("logp_new", logp_new)
    shape = tuple(logp_new.shape)
    _check_token_tensor("logp_old", logp_old, shape)
    _check_mask(mask, shape)
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0.0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (reference-policy log-probs)")
    if logp_ref is not None:
        _check_token_tensor("logp_ref", logp_ref, shape)

    # Old and reference log-probs are data, not functions of the parameters being trained.
    logp_old = logp_old.detach()  # (B, T)
    advantages = advantages.detach()  # (B,)
    per_token = per_token_surrogate(logp_new, logp_old, advantages, eps_low, eps_high)  # (B, T)
    m = mask.to(per_token.dtype)  # (B, T)

    if beta > 0.0:
        kl = kl_k3(logp_new, logp_ref.detach())  # (B, T)
        per_token = per_token + beta * kl  # (B, T)
        kl_mean = _masked_mean(kl.detach(), m)  # ()
    else:
        kl_mean = per_token.new_zeros(())  # ()

    loss = aggregate(per_token, mask, mode, max_completion_length)  # ()

    with torch.no_grad():
        ratio = torch.exp(logp_new - logp_old)  # (B, T)
        adv = advantages[:, None]  # (B, 1)
        low = (ratio < 1.0 - eps_low) & (adv < 0)  # (B, T) bool
        high = (ratio > 1.0 + eps_high) & (adv > 0)  # (B, T) bool
        clip_low_fraction = _masked_mean(low.to(m.dtype), m)  # ()
        clip_high_fraction = _masked_mean(high.to(m.dtype), m)  # ()
        clip_fraction = _masked_mean((low | high).to(m.dtype), m)  # ()
        ratio_mean = _masked_mean(ratio, m)  # ()

    return GRPOLossOutput(
        loss=loss,
        clip_fraction=clip_fraction,
        clip_low_fraction=clip_low_fraction,
        clip_high_fraction=clip_high_fraction,
        kl_mean=kl_mean,
        ratio_mean=ratio_mean,
    )


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of ``tokens`` under ``softmax(logits / temperature)``, gathered per position.

    Args:
        logits: (B, T, V) logits, row t predicting ``tokens[:, t]`` (already shifted by the caller).
        tokens: (B, T) integer token ids in [0, V).
        temperature: > 0, the sampling temperature, so that the log-probs are those of the
            distribution the rollout sampled from (also what the rollout reports as logp_old).

    Returns:
        (B, T) float32 log-probs (float64 when ``logits`` is float64). Computed as
        ``logit[token] / temperature - logsumexp(logits / temperature)`` one sequence at a time, so
        the only (., ., V) temporary is one float32 (T, V) row instead of a (B, T, V)
        log_softmax; differentiable w.r.t. ``logits``.
    """
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (B, T, V) tensor, got {tuple(logits.shape)}")
    if tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}, expected {tuple(logits.shape[:2])}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    # bf16/fp16 logsumexp over a large V loses digits that the ratio exp(new - old) magnifies.
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    picked = logits.gather(-1, tokens.long()[..., None]).squeeze(-1).to(dtype)  # (B, T)
    lse = torch.stack(
        [torch.logsumexp(row.to(dtype) / temperature, dim=-1) for row in logits]  # each (T,)
    )  # (B, T)
    return picked / temperature - lse  # (B, T)

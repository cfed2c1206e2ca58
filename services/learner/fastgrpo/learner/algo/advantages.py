"""Group-relative advantages for GRPO.

Rewards arrive group-contiguous: Q prompts x G samples each, flattened to N = Q * G, so sample
``i`` belongs to group ``i // G``. Every function here is pure and sync-free (no ``.item()``):
results stay on the rewards' device so the metrics layer decides when to read them.

Standard deviations are *unbiased* (Bessel-corrected, ``torch.std`` default), as in TRL's
``GRPOTrainer``; with G = 8 this is sqrt(8/7) ~ 1.07x the population std, so advantages are
about 6.5% smaller than with a population std. ``eps`` defaults to TRL's 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _check_rewards(rewards: Tensor, group_size: int) -> None:
    """Raise ValueError unless ``rewards`` is a float (N,) tensor of whole groups of size >= 2."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {rewards.dtype}")
    # One sample per group has no baseline and an undefined (NaN) unbiased std.
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards length {rewards.numel()} is not a positive multiple of "
            f"group_size {group_size}"
        )


@dataclass(frozen=True)
class GroupRewardStats:
    """Per-group reward statistics of one GRPO batch (all tensors, on the rewards' device).

    Attributes:
        group_mean: (Q,) mean reward of each group (the GRPO baseline).
        group_std: (Q,) unbiased std of each group's rewards.
        zero_std: (Q,) bool, True where every reward in the group is identical; such groups get an
            advantage of exactly zero, so they carry no policy gradient (only the KL term).
        frac_zero_std: () float, fraction of groups with ``zero_std`` (TRL's
            ``frac_reward_zero_std``); a high value means the task is too easy or too hard.
    """

    group_mean: Tensor
    group_std: Tensor
    zero_std: Tensor
    frac_zero_std: Tensor


def group_reward_stats(rewards: Tensor, group_size: int) -> GroupRewardStats:
    """Mean, unbiased std and zero-variance flags of each group of ``group_size`` rewards.

    Args:
        rewards: (N,) float rewards, group-contiguous, N = Q * group_size.
        group_size: G, samples per prompt (>= 2).

    Returns:
        GroupRewardStats with (Q,) tensors and the scalar ``frac_zero_std``.

    ``zero_std`` tests exact equality rather than ``std < tol``: the std of identical floats is
    rounding noise (e.g. three rewards of 0.1 in float64 give std ~1e-17), and exact equality is
    the condition under which the advantage must be zero whatever the reward scale.
    """
    _check_rewards(rewards, group_size)
    grouped = rewards.view(-1, group_size)  # (Q, G)
    group_mean = grouped.mean(dim=1)  # (Q,)
    group_std = grouped.std(dim=1)  # (Q,) unbiased, as torch.std / TRL
    zero_std = (grouped == grouped[:, :1]).all(dim=1)  # (Q,) bool
    frac_zero_std = zero_std.to(rewards.dtype).mean()  # ()
    return GroupRewardStats(
        group_mean=group_mean, group_std=group_std, zero_std=zero_std, frac_zero_std=frac_zero_std
    )


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by a std.

    Args:
        rewards: (N,) float rewards, group-contiguous (sample i is in group i // group_size).
        group_size: G, samples per prompt (>= 2).
        scale: how the centred reward is divided:
            "group": (r - mean_g) / (std_g + eps), the original GRPO (DeepSeekMath);
            "batch": (r - mean_g) / (std over all N rewards + eps), which keeps the relative size
                of groups with different spreads (the "batch" option of TRL);
            "none":  r - mean_g, Dr. GRPO's choice: dividing by std_g over-weights groups whose
                rewards barely differ (question-level difficulty bias).
        eps: added to the std so that near-constant groups do not blow up (TRL uses 1e-4).

    Returns:
        (N,) advantages in the rewards' dtype. Groups whose rewards are all identical get exactly
        0.0 (TRL leaves the rounding noise of r - mean there); elsewhere the value is TRL's.
    """
    _check_rewards(rewards, group_size)
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    stats = group_reward_stats(rewards, group_size)
    grouped = rewards.view(-1, group_size)  # (Q, G)
    centred = grouped - stats.group_mean[:, None]  # (Q, G)
    if scale == "group":
        centred = centred / (stats.group_std[:, None] + eps)  # (Q, G)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)  # (Q, G) unbiased std over all N rewards
    # The mean of identical floats need not round back to the value itself (3 x 0.1 -> mean
    # 0.10000000000000002), so force exact zeros: the learner drops zero-advantage samples.
    centred = torch.where(stats.zero_std[:, None], torch.zeros_like(centred), centred)  # (Q, G)
    return centred.reshape(-1)  # (N,)

"""GRPO math: group advantages, the clipped per-token surrogate, k3 KL and loss aggregation.

Pure tensor functions with no knowledge of models, tasks or the network.
"""
from fastgrpo.learner.algo.advantages import (
    ADVANTAGE_SCALES,
    AdvantageScale,
    GroupRewardStats,
    group_advantages,
    group_reward_stats,
)
from fastgrpo.learner.algo.loss import (
    LOSS_MODES,
    GRPOLossOutput,
    LossMode,
    aggregate,
    grpo_loss,
    kl_k3,
    per_token_surrogate,
    token_logprobs,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "AdvantageScale",
    "GroupRewardStats",
    "group_advantages",
    "group_reward_stats",
    "LOSS_MODES",
    "GRPOLossOutput",
    "LossMode",
    "aggregate",
    "grpo_loss",
    "kl_k3",
    "per_token_surrogate",
    "token_logprobs",
]

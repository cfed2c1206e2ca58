"""The draft head's training loss (EAGLE, weights from the FastGRPO code).

For every pair position i the head predicts f_{i+1}; two terms compare it with the target:
  * SmoothL1(f̂_{i+1}, f_{i+1}): regress the target's next feature (what deeper tree levels feed on);
  * soft cross-entropy between the target's next-token distribution softmax(lm_head(f_{i+1})) and
    the draft's softmax(lm_head(f̂_{i+1})): what decides acceptance.
The target distribution comes from the features through the shared lm_head, so nothing beyond the
target's hidden states has to be stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DraftLoss:
    loss: torch.Tensor  # () with grad
    feature_loss: torch.Tensor  # () detached
    ce_loss: torch.Tensor  # () detached
    top1: torch.Tensor  # () detached: draft argmax == target argmax, over valid positions


def draft_loss(
    pred_features: torch.Tensor,
    target_features: torch.Tensor,
    lm_head: torch.nn.Module,
    valid: torch.Tensor,
    feature_weight: float = 2.0,
    ce_weight: float = 0.1,
) -> DraftLoss:
    """pred/target features (B, S, H), valid (B, S) bool (positions whose target f_{i+1} exists)."""
    assert pred_features.shape == target_features.shape and valid.shape == pred_features.shape[:2]
    m = valid.float()  # (B, S)
    n = m.sum().clamp(min=1.0)
    feat = F.smooth_l1_loss(pred_features.float(), target_features.float(), reduction="none").mean(-1)  # (B, S)
    feature_loss = (feat * m).sum() / n
    with torch.no_grad():
        target_logp = torch.log_softmax(lm_head(target_features).float(), -1)  # (B, S, V)
    draft_logp = torch.log_softmax(lm_head(pred_features).float(), -1)  # (B, S, V)
    ce = -(target_logp.exp() * draft_logp).sum(-1)  # (B, S)
    ce_loss = (ce * m).sum() / n
    top1 = ((draft_logp.argmax(-1) == target_logp.argmax(-1)).float() * m).sum() / n
    loss = feature_weight * feature_loss + ce_weight * ce_loss
    return DraftLoss(loss, feature_loss.detach(), ce_loss.detach(), top1.detach())

"""Training the draft head on (target feature, next token) sequences.

A FeatureSequence (speculative.pairs) is exactly what the draft reads at inference. The head
learns to predict f_{i+1} (and through lm_head the target's next-token distribution) from pairs
0..i, so the same sequences come from offline rollouts or, online, from the pairs the target
computed while verifying.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.rollout.draft_learning.loss import DraftLoss, draft_loss
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.pairs import FeatureSequence


@dataclass(frozen=True)
class DraftTrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    feature_weight: float = 2.0
    ce_weight: float = 0.1
    grad_clip: float = 0.5
    max_positions: int = 512  # longer sequences are cut into windows of this many pairs
    warmup_steps: int = 0  # the learning rate ramps up linearly over this many first steps


def batch_sequences(seqs: list[FeatureSequence], device, dtype):
    """Right-padded tensors: tokens (B, S), features (B, S, H), positions (B, S), valid pairs (B, S),
    and which positions have a next feature to predict (B, S)."""
    S = max(len(s.tokens) for s in seqs)
    H = seqs[0].features.shape[-1]
    B = len(seqs)
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S)
    feats = torch.zeros(B, S, H, dtype=dtype, device=device)  # (B, S, H)
    positions = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S)
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S)
    for b, s in enumerate(seqs):
        n = len(s.tokens)
        tokens[b, :n] = s.tokens.to(device)
        feats[b, :n] = s.features.to(device, dtype)
        positions[b, :n] = s.start + torch.arange(n, device=device)
        valid[b, :n] = True
    has_target = valid.clone()
    has_target[:, :-1] &= valid[:, 1:]  # pair i is trained when f_{i+1} exists
    has_target[:, -1] = False
    for b, s in enumerate(seqs):
        has_target[b, : s.loss_from] = False
    return tokens, feats, positions, valid, has_target


def windows(seq: FeatureSequence, size: int) -> list[FeatureSequence]:
    """Cuts a long sequence into windows of `size` pairs overlapping by one (each target f_{i+1}
    stays inside some window with its input)."""
    n = len(seq.tokens)
    if n <= size:
        return [seq]
    out, i = [], 0
    while i < n - 1:
        j = min(i + size, n)
        out.append(FeatureSequence(seq.tokens[i:j], seq.features[i:j], seq.start + i, max(0, seq.loss_from - i)))
        i = j - 1
    return out


class DraftTrainer:
    """AdamW on the head's own weights (fc + layer); embedding and lm_head stay the target's."""

    def __init__(self, head: DraftHead, config: DraftTrainConfig = DraftTrainConfig()):
        self.head = head
        self.config = config
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps = 0

    def step(self, seqs: list[FeatureSequence]) -> DraftLoss:
        """One optimiser step on a batch of sequences."""
        cfg = self.config
        pieces = [w for s in seqs for w in windows(s, cfg.max_positions)]
        param = next(self.head.parameters())
        tokens, feats, positions, valid, has_target = batch_sequences(pieces, param.device, param.dtype)
        if cfg.warmup_steps > 0:
            # a fresh AdamW moves every weight by ~lr in its first steps whatever the gradient's size:
            # on a trained head (online learning) that is a jolt that costs acceptance before it helps
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.steps + 1) / cfg.warmup_steps)
        self.head.train()
        pred = self.head(tokens, feats, positions, valid)  # (B, S, H)
        # prediction at pair i is compared with f_{i+1}
        target = torch.cat([feats[:, 1:], feats[:, -1:]], dim=1)  # (B, S, H)
        out = draft_loss(pred, target, self.head.lm_head, has_target, cfg.feature_weight, cfg.ce_weight)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.head.eval()
        self.steps += 1
        return out

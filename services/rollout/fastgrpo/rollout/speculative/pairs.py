"""The pairs a draft head reads: pair i = (f_i, x_{i+1}), the target's final-norm hidden state at
position start + i and the token after it. The speculative step feeds them to the draft as they
settle and, for draft learning, hands a finished sequence's pairs on as one FeatureSequence; offline
training captures the same pairs from whole rollouts."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FeatureSequence:
    tokens: torch.Tensor  # (S,) long: x_{i+1}, the token after position start + i
    features: torch.Tensor  # (S, H): f_i, the target's final-norm hidden state at position start + i
    start: int = 0
    # pairs before this one are context only, never trained on: online captures start the loss at the
    # prompt's last pair, whose prediction is the first token the draft ever proposes (the prompt's
    # own next tokens are text the policy did not choose, and the draft never drafts inside a prompt)
    loss_from: int = 0

    def __post_init__(self):
        assert self.tokens.dim() == 1 and self.features.shape[0] == self.tokens.shape[0]

    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size() + self.features.numel() * self.features.element_size()

"""What the scheduler takes and reports: a generation request (its results are
`fastgrpo.wire.records.Completion`s), what one engine step did, and request validation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastgrpo.wire.records import Sampling


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompts: tuple[tuple[int, ...], ...]  # token ids per prompt
    num_samples: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    spec_mode: str | None = None  # "adaptive" | "static" | "off"; None = the server's mode


@dataclass(frozen=True)
class StepReport:
    """What one engine step did, for the metrics layer: counts and seconds only."""

    seconds: float  # wall time: prefill of the admitted sequences, then one decode step
    batch_size: int  # B: sequences in the decode step (0 when the step only prefilled)
    decode_tokens: int  # tokens those B sequences gained (after stop / length truncation)
    first_token_seconds: tuple[float, ...]  # per admitted sequence: its request's submit -> its first token
    accept_lengths: tuple[int, ...]  # per speculatively decoded sequence: tokens its verify step emitted (accepted + 1)


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    max_context: int


class KVCacheTooSmall(OverflowError):
    """A sequence of the request would not fit the whole KV cache even alone (RESOURCE_EXHAUSTED;
    a retry does not help). The message says what it needs and what the cache holds."""


class InvalidRequest(ValueError):
    """A request field is out of range. `field` names it (as in the proto) for the error message."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def validate_request(req: GenerationRequest, limits: EngineLimits) -> None:
    """Raises InvalidRequest naming the first bad field; returns None for a request the engine can run."""
    s = req.sampling
    if req.spec_mode not in (None, "adaptive", "static", "off"):
        raise InvalidRequest("spec_mode", f"must be adaptive, static or off, got {req.spec_mode!r}")
    if req.num_samples < 1:
        raise InvalidRequest("num_samples", f"must be >= 1, got {req.num_samples}")
    if not req.prompts:
        raise InvalidRequest("prompts", "at least one prompt is required")
    if not (isinstance(s.temperature, (int, float)) and math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k == 0 or s.top_k < -1:
        raise InvalidRequest("sampling.top_k", f"must be -1 (off) or >= 1, got {s.top_k}")
    if s.max_new_tokens < 1:
        raise InvalidRequest("sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    for t in s.stop_token_ids:
        if not 0 <= t < limits.vocab_size:
            raise InvalidRequest("sampling.stop_token_ids", f"id {t} is outside [0, {limits.vocab_size})")
    for i, p in enumerate(req.prompts):
        if len(p) == 0:
            raise InvalidRequest(f"prompts[{i}]", "prompt is empty")
        bad = [t for t in p if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompts[{i}].token_ids", f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})"
            )
        if len(p) + s.max_new_tokens > limits.max_context:
            raise InvalidRequest(
                "sampling.max_new_tokens",
                f"prompts[{i}] has {len(p)} tokens; {len(p)} + max_new_tokens {s.max_new_tokens} exceeds the "
                f"context length {limits.max_context}",
            )

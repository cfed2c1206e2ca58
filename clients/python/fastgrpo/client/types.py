"""Typed results of the rollout client, and the exception that carries a gRPC status."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import grpc

from fastgrpo.v1 import rollout_pb2 as pb

FinishReason = Literal["stop", "length", "abort", "unspecified"]
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
}


class RolloutError(Exception):
    """A failed call. `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = ""):
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self.code = code
        self.details = details
        self.method = method


class ChecksumMismatch(RolloutError):
    """The rollout service serves weights whose checksum differs from the one computed locally."""

    def __init__(self, expected: str, got: str, address: str):
        super().__init__(grpc.StatusCode.DATA_LOSS, f"{address} serves checksum {got}, expected {expected}", "UpdateWeights")
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of a Generate call (see SamplingParams in rollout.proto)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def to_pb(self) -> pb.SamplingParams:
        return pb.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=list(self.stop_token_ids),
            seed=self.seed or 0,
            has_seed=self.seed is not None,
            ignore_eos=self.ignore_eos,
        )


@dataclass(frozen=True)
class SpecStats:
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    accepted_per_depth: tuple[int, ...] = ()  # [d]: draft tokens accepted at tree depth d + 1

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per verify step (accepted draft tokens plus the target's own token)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @staticmethod
    def total(stats: "list[SpecStats]") -> "SpecStats":
        """Counts summed over completions (acceptance_length of the total weights steps, not sequences)."""
        depth = max((len(s.accepted_per_depth) for s in stats), default=0)
        return SpecStats(sum(s.drafted_tokens for s in stats), sum(s.accepted_tokens for s in stats),
                         sum(s.verify_steps for s in stats),
                         tuple(sum(s.accepted_per_depth[d] for s in stats if d < len(s.accepted_per_depth))
                               for d in range(depth)))


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    spec: SpecStats
    text: str

    @staticmethod
    def from_pb(c: pb.Completion) -> "Completion":
        return Completion(
            request_id=c.request_id,
            prompt_index=c.prompt_index,
            sample_index=c.sample_index,
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            finish_reason=_FINISH.get(c.finish_reason, "unspecified"),
            policy_version=c.policy_version,
            spec=SpecStats(c.spec.drafted_tokens, c.spec.accepted_tokens, c.spec.verify_steps,
                           tuple(c.spec.accepted_per_depth)),
            text=c.text,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    num_parameters: int
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    eos_token_id: int


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding now: mode, C_peak and its source, live B and the latest tree (0 = plain),
    the C_peak the server started with (the online estimate moves away from it), and alpha live and at start."""

    mode: str
    c_peak: float
    c_peak_source: str
    batch_size: int
    n_verify: int
    width: int
    depth: int
    c_peak_start: float
    c_peak_start_source: str
    c_peak_updates: int
    alpha: float  # depth scaling, L = log2(N_verify / alpha): live, as started, and moves so far
    alpha_start: float
    alpha_updates: int


@dataclass(frozen=True)
class Status:
    policy_version: int
    policy_checksum: str
    running_sequences: int
    queued_sequences: int
    max_running_sequences: int
    draft_version: int
    model: ModelInfo
    speculation: Speculation

    @staticmethod
    def from_pb(s: pb.StatusReply) -> "Status":
        m = s.model
        return Status(
            policy_version=s.policy_version,
            policy_checksum=s.policy_checksum,
            running_sequences=s.running_sequences,
            queued_sequences=s.queued_sequences,
            max_running_sequences=s.max_running_sequences,
            draft_version=s.draft_version,
            model=ModelInfo(m.name, m.architecture, m.num_parameters, m.vocab_size, m.max_context, m.dtype,
                            m.device, m.eos_token_id),
            speculation=Speculation(s.speculation.mode, s.speculation.c_peak, s.speculation.c_peak_source,
                                    s.speculation.batch_size, s.speculation.n_verify, s.speculation.width,
                                    s.speculation.depth, s.speculation.c_peak_start,
                                    s.speculation.c_peak_start_source, s.speculation.c_peak_updates,
                                    s.speculation.alpha, s.speculation.alpha_start, s.speculation.alpha_updates),
        )


@dataclass(frozen=True)
class DraftTraining:
    """State of the service's online draft learning (TrainDraftReply)."""

    draft_version: int
    every_n_batches: int
    rounds: int
    steps: int
    last_loss: float
    last_top1: float
    samples_seen: int
    seconds: float
    buffer_sequences: int
    buffer_bytes: int
    dropped_sequences: int

    @staticmethod
    def from_pb(r: pb.TrainDraftReply) -> "DraftTraining":
        return DraftTraining(r.draft_version, r.every_n_batches, r.rounds, r.steps, r.last_loss, r.last_top1,
                             r.samples_seen, r.seconds, r.buffer_sequences, r.buffer_bytes, r.dropped_sequences)


@dataclass(frozen=True)
class UpdateResult:
    address: str
    version: int
    checksum: str
    seconds: float
    bytes_sent: int


@dataclass
class GroupedBatch:
    """A whole GRPO batch: completions[i][j] is sample j of prompt i."""

    completions: list[list[Completion]] = field(default_factory=list)

    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]

    def spec(self) -> SpecStats:
        """Speculation counts summed over every completion of the batch."""
        return SpecStats.total([c.spec for c in self.flat()])

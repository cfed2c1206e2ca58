"""What the clients return and raise: the records that travel (defined once, in fastgrpo.wire.records),
a grouped GRPO batch, and the exception that carries a gRPC status."""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from fastgrpo.wire.records import (
    Completion,
    DraftTraining,
    FinishReason,
    ModelInfo,
    Sampling,
    Speculation,
    SpecStats,
    Status,
    UpdateResult,
)

__all__ = ["ChecksumMismatch", "Completion", "DraftTraining", "FinishReason", "GroupedBatch", "ModelInfo", "ReplicaState",
           "RolloutError", "Sampling", "Speculation", "SpecStats", "Status", "UpdateResult"]


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


@dataclass
class GroupedBatch:
    """A whole GRPO batch: completions[i][j] is sample j of prompt i."""

    completions: list[list[Completion]] = field(default_factory=list)

    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]

    def spec(self) -> SpecStats:
        """Speculation counts summed over every completion of the batch."""
        return SpecStats.total([c.spec for c in self.flat()])


@dataclass(frozen=True)
class ReplicaState:
    """One replica as a client sees it: whether it gets work, and how often it was set aside and rejoined."""

    address: str
    in_service: bool
    set_asides: int = 0  # times a failed call set it aside
    rejoins: int = 0  # times `rejoin` put it back in service
    last_error: str = ""  # why it was last set aside

"""Python clients of the fastgrpo rollout service (blocking and asyncio), over one core."""
from fastgrpo.client.aio import AsyncRolloutClient
from fastgrpo.client.core import NO_RETRY, RetryPolicy
from fastgrpo.client.sync import RolloutClient
from fastgrpo.client.types import (
    ChecksumMismatch,
    Completion,
    DraftTraining,
    GroupedBatch,
    ModelInfo,
    ReplicaState,
    RolloutError,
    Sampling,
    Speculation,
    SpecStats,
    Status,
    UpdateResult,
)
from fastgrpo.client.weights import WeightMirror

__all__ = [
    "AsyncRolloutClient",
    "RolloutClient",
    "RetryPolicy",
    "NO_RETRY",
    "ChecksumMismatch",
    "Completion",
    "DraftTraining",
    "GroupedBatch",
    "ModelInfo",
    "ReplicaState",
    "RolloutError",
    "Sampling",
    "Speculation",
    "SpecStats",
    "Status",
    "UpdateResult",
    "WeightMirror",
]

"""How the scheduler tells the layers above it what happened, and takes work from them.

The engine knows no metrics and no draft learning: it calls whatever observers it was given after
each step and each finished sequence, and between steps runs whatever background work it was given.
"""
from __future__ import annotations

from typing import Protocol

from fastgrpo.rollout.scheduler.requests import GenerationRequest, StepReport
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.wire.records import Completion


class EngineObserver:
    """Told what each step, each finished sequence and each finished request did; this one ignores it.

    Called on the engine thread: implementations must be cheap (counter updates, appends; no I/O).
    """

    # True: sequence_done receives every finished sequence's (target feature, next token) pairs,
    # which the engine then keeps while the sequence runs (draft learning wants them; metrics do not)
    wants_pairs: bool = False

    def step_done(self, report: StepReport) -> None:
        pass

    def sequence_done(self, result: Completion, seconds: float, pairs: FeatureSequence | None) -> None:
        """A sequence finished (also by abort); seconds from its request's submit to now. pairs:
        its pairs when an observer wants them and it was not aborted, else None."""

    def request_done(self, request: GenerationRequest) -> None:
        """Every sequence of a request that was not cancelled has been delivered."""


class BackgroundWork(Protocol):
    """Work the engine thread runs between two steps, one piece at a time (a draft-training round)."""

    def has_work(self) -> bool:
        """Whether a piece is waiting (the engine wakes for it even with nothing to decode)."""

    def urgent(self) -> bool:
        """Whether its pieces run between decode steps too; otherwise only while nothing decodes."""

    def run_step(self) -> None:
        """Runs one piece (one optimiser step)."""

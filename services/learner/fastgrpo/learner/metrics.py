"""Prometheus metrics of the learner: one update per GRPO step, from its StepStats."""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:  # the loop pulls in torch and transformers; `--help` should not
    from fastgrpo.client import ReplicaState
    from fastgrpo.learner.loop import StepStats

PHASES = ("generate", "score", "train", "push")

# StepStats field -> gauge of the latest step's value
GAUGES = {
    "reward_mean": ("fastgrpo_learner_reward_mean", "Mean reward of the latest step's completions"),
    "reward_std": ("fastgrpo_learner_reward_std", "Reward standard deviation of the latest step"),
    "accuracy": ("fastgrpo_learner_accuracy", "Fraction of the latest step's completions that were correct"),
    "frac_zero_std": ("fastgrpo_learner_zero_std_group_ratio",
                      "Fraction of the latest step's groups whose rewards were all equal (no learning signal)"),
    "loss": ("fastgrpo_learner_loss", "GRPO loss of the latest step"),
    "kl": ("fastgrpo_learner_kl", "Mean KL to the reference policy in the latest step (0 with beta 0)"),
    "clip_fraction": ("fastgrpo_learner_clip_fraction", "Fraction of tokens whose ratio was clipped in the latest step"),
    "grad_norm": ("fastgrpo_learner_grad_norm", "Gradient norm of the latest step (before clipping)"),
    "tokens_per_s": ("fastgrpo_learner_rollout_tokens_per_second",
                     "Completion tokens per second of the latest step's generate phase"),
    "new_version": ("fastgrpo_learner_policy_version", "Policy version served after the latest push"),
}


class LearnerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ready = threading.Event()  # set once the policy is loaded and in sync with the rollout service
        self.steps = Counter("fastgrpo_learner_steps", "GRPO steps completed", registry=r)
        self.completion_tokens = Counter("fastgrpo_learner_completion_tokens", "Completion tokens trained on",
                                         registry=r)
        self.dropped = Counter("fastgrpo_learner_dropped_stale_completions",
                               "Completions dropped for coming from a too old policy version", registry=r)
        self.gauges = {field: Gauge(name, help, registry=r) for field, (name, help) in GAUGES.items()}
        self.phase_seconds = Gauge("fastgrpo_learner_step_phase_seconds", "Seconds of each phase of the latest step",
                                   ["phase"], registry=r)

    def track_replicas(self, states: Callable[[], Sequence["ReplicaState"]]) -> None:
        """Exports each rollout replica's state, read from `states` (e.g. the learner's
        `client.replica_states`) at every scrape."""
        self.registry.register(ReplicaCollector(states))

    def record(self, s: "StepStats") -> None:
        self.steps.inc()
        self.completion_tokens.inc(s.completion_tokens)
        self.dropped.inc(s.dropped_stale)
        for field, gauge in self.gauges.items():
            gauge.set(getattr(s, field))
        for phase in PHASES:
            self.phase_seconds.labels(phase).set(getattr(s, f"{phase}_s"))


class ReplicaCollector:
    """Per-replica series, labelled replica="host:port": up (1 while it gets work, 0 while set aside),
    and how often it was set aside and re-synced back (full weights unless it served them already)."""

    def __init__(self, states: Callable[[], Sequence["ReplicaState"]]):
        self.states = states

    def collect(self):
        up = GaugeMetricFamily("fastgrpo_learner_replica_up",
                               "1 while a rollout replica gets work, 0 while it is set aside", labels=["replica"])
        set_asides = CounterMetricFamily("fastgrpo_learner_replica_set_asides",
                                         "Times a rollout replica was set aside after a failed call", labels=["replica"])
        resyncs = CounterMetricFamily("fastgrpo_learner_replica_resyncs",
                                      "Times a rollout replica was re-synced to the learner's weights and given work "
                                      "again", labels=["replica"])
        for s in self.states():
            up.add_metric([s.address], float(s.in_service))
            set_asides.add_metric([s.address], s.set_asides)
            resyncs.add_metric([s.address], s.rejoins)
        yield from (up, set_asides, resyncs)


@contextlib.contextmanager
def exported(host: str, port: int, out=sys.stdout) -> Iterator[LearnerMetrics]:
    """LearnerMetrics, served on host:port (/metrics, /healthz, /readyz) while the block runs;
    port 0 picks a free one, announced on `out`; port -1 serves nothing."""
    metrics = LearnerMetrics()
    if port < 0:
        yield metrics
        return
    from fastgrpo.common.http import HttpSide  # FastAPI and uvicorn only when served

    http = HttpSide(metrics.registry, metrics.ready.is_set, host, port)
    print(f"fastgrpo-learner: http on {host}:{http.port}", file=out, flush=True)
    try:
        yield metrics
    finally:
        http.stop()

"""Prometheus metrics of the rollout service, in a registry of its own per server.

Three sources, each read where it is cheapest:
  - the engine thread reports each step and each finished sequence (`EngineObserver`): counters and
    histograms only, a handful of updates per step;
  - the servicer reports requests and weight updates;
  - state that already exists (running / queued sequences, versions, the live tree shape, draft
    learning) is read at scrape time from the server's status, never mirrored on the hot path.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fastgrpo.rollout.draft_learning.online import OnlineDraftLearner
from fastgrpo.rollout.scheduler.observer import EngineObserver
from fastgrpo.rollout.scheduler.requests import StepReport
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.wire.records import Completion, Status

FINISH_REASONS = ("stop", "length", "abort")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SPEEDUP_WINDOW = 64  # decode steps the speedup estimate averages over: one step alone is mostly its batch's tail


class RolloutMetrics(EngineObserver):
    def __init__(self, max_depth: int = 0):
        """max_depth: the deepest tree any step can draft; its depth labels are exported from the start."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastgrpo_rollout_requests", "Generate requests accepted into the engine queue", registry=r)
        self.refused = Counter("fastgrpo_rollout_refused_calls", "Calls refused, by method and status code (bad input, "
                               "over a limit, idle, cancelled)", ["method", "code"], registry=r)
        self.finished = Counter("fastgrpo_rollout_finished_sequences", "Sequences finished, by finish reason",
                                ["reason"], registry=r)
        self.generated = Counter("fastgrpo_rollout_generated_tokens", "Tokens generated (completions of finished sequences)",
                                 registry=r)
        self.drafted = Counter("fastgrpo_rollout_drafted_tokens", "Draft tokens sent to verification", registry=r)
        self.accepted = Counter("fastgrpo_rollout_accepted_tokens",
                                "Draft tokens accepted by verification, by tree depth (1 = the root's child)",
                                ["depth"], registry=r)
        self.accepted_by_source = Counter("fastgrpo_rollout_source_accepted_tokens",
                                          "Draft tokens accepted by verification, by where the draft came from: head "
                                          "(the draft model), siblings (the other samples' text), history (the "
                                          "prompt's earlier completions)", ["source"], registry=r)
        self.verify_steps = Counter("fastgrpo_rollout_verify_steps",
                                    "Verify steps (one per sequence and speculative decode step)", registry=r)
        self.acceptance_length = Histogram(
            "fastgrpo_rollout_acceptance_length", "Tokens one verify step emitted for one sequence (accepted + 1)",
            buckets=tuple(range(1, max(max_depth, 8) + 2)), registry=r)
        self.speedup = Gauge("fastgrpo_rollout_estimated_speedup",
                             f"Tokens emitted per sequence and target forward over the latest {SPEEDUP_WINDOW} decode "
                             "steps (1 = plain decoding)", registry=r)
        self._recent: deque[tuple[int, int]] = deque(maxlen=SPEEDUP_WINDOW)  # (tokens, B) per decode step
        self.step_seconds = Histogram("fastgrpo_rollout_step_seconds",
                                      "Wall time of one engine step (prefill of admitted sequences, then one decode step)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.ttft = Histogram("fastgrpo_rollout_time_to_first_token_seconds",
                              "Per sequence: its Generate request's arrival to its first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("fastgrpo_rollout_e2e_latency_seconds",
                             "Per sequence: its Generate request's arrival to its completion (aborted ones excluded)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.update_seconds = Histogram("fastgrpo_rollout_weight_update_seconds",
                                        "UpdateWeights calls: header to committed weights", ["target"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.update_bytes = Counter("fastgrpo_rollout_weight_update_bytes", "Tensor bytes received by UpdateWeights",
                                    ["target"], registry=r)
        # label values known up front are exported as zeros from the start, so rates exist at once
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.update_seconds.labels("policy")
        self.update_bytes.labels("policy")
        for depth in range(1, max_depth + 1):
            self.accepted.labels(str(depth))
        for source in ("head", "siblings", "history"):
            self.accepted_by_source.labels(source)

    # ---------------------------------------------------------------- engine thread
    def step_done(self, report: StepReport) -> None:
        self.step_seconds.observe(report.seconds)
        for seconds in report.first_token_seconds:
            self.ttft.observe(seconds)
        for n in report.accept_lengths:
            self.acceptance_length.observe(n)
        if report.batch_size:
            self._recent.append((report.decode_tokens, report.batch_size))
            self.speedup.set(sum(t for t, _ in self._recent) / sum(b for _, b in self._recent))

    def sequence_done(self, result: Completion, seconds: float, pairs: FeatureSequence | None) -> None:
        self.finished.labels(result.finish_reason).inc()
        self.generated.inc(len(result.token_ids))
        spec = result.spec
        if spec.verify_steps:
            self.drafted.inc(spec.drafted_tokens)
            self.verify_steps.inc(spec.verify_steps)
            for depth, n in enumerate(spec.accepted_per_depth, start=1):
                self.accepted.labels(str(depth)).inc(n)
            for source, n in (("head", spec.accepted_head), ("siblings", spec.accepted_siblings),
                              ("history", spec.accepted_history)):
                self.accepted_by_source.labels(source).inc(n)
        if result.finish_reason != "abort":
            self.e2e.observe(seconds)

    # ---------------------------------------------------------------- servicer threads
    def weights_updated(self, target: str, seconds: float, nbytes: int) -> None:
        self.update_seconds.labels(target).observe(seconds)
        self.update_bytes.labels(target).inc(nbytes)

    def watch(self, status: Callable[[], Status], draft_learner: OnlineDraftLearner | None = None) -> None:
        """Exports the server's status (and the online draft learner's stats) at every scrape."""
        self.registry.register(_StatusCollector(status, draft_learner))


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value)


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], Status], draft_learner: OnlineDraftLearner | None):
        self._status = status
        self._learner = draft_learner

    def collect(self):
        st = self._status()
        yield _gauge("fastgrpo_rollout_running_sequences", "Sequences decoding now", st.running_sequences)
        yield _gauge("fastgrpo_rollout_queued_sequences", "Sequences waiting to be admitted (KV-cache blocks, batch)",
                     st.queued_sequences)
        yield _gauge("fastgrpo_rollout_max_running_sequences", "Most sequences decoding at once (--max-running)",
                     st.max_running_sequences)
        kv = st.kv_cache
        blocks = GaugeMetricFamily("fastgrpo_rollout_kv_blocks", "KV-cache blocks by state: used (held by running "
                                   "sequences), cached (a prompt prefix nobody holds), free", labels=["state"])
        for state, n in (("used", kv.blocks_used), ("cached", kv.blocks_cached), ("free", kv.blocks_free)):
            blocks.add_metric([state], n)
        yield blocks
        yield _gauge("fastgrpo_rollout_kv_block_size", "Tokens per KV-cache block", kv.block_size)
        yield _gauge("fastgrpo_rollout_kv_cache_bytes", "Bytes of the KV cache's blocks", kv.bytes_total)
        yield _counter("fastgrpo_rollout_preemptions",
                       "Sequences preempted when decoding ran out of KV-cache blocks (recomputed later)", kv.preemptions)
        yield _counter("fastgrpo_rollout_shared_prompt_tokens",
                       "Prompt tokens whose keys and values came from shared blocks instead of a prefill",
                       kv.shared_prompt_tokens)
        yield _gauge("fastgrpo_rollout_policy_version", "Version of the served policy weights", st.policy_version)
        spec = st.speculation
        if spec.mode:  # served with a draft
            yield _gauge("fastgrpo_rollout_draft_version", "Version of the served draft head", st.draft_version)
            yield _gauge("fastgrpo_rollout_spec_batch_size", "B: sequences in the latest decode step", spec.batch_size)
            yield _gauge("fastgrpo_rollout_spec_n_verify",
                         "N_verify: tree nodes verified per sequence in the latest decode step (0 = plain decoding)",
                         spec.n_verify)
            yield _gauge("fastgrpo_rollout_spec_width", "K: tree width of the latest decode step", spec.width)
            yield _gauge("fastgrpo_rollout_spec_depth", "L: tree depth of the latest decode step", spec.depth)
            yield _gauge("fastgrpo_rollout_spec_c_peak", "C_peak: tokens per target forward at the compute knee (live)",
                         spec.c_peak)
            yield _gauge("fastgrpo_rollout_spec_c_peak_start", "C_peak the server started with (calibrated or configured)",
                         spec.c_peak_start)
            yield _counter("fastgrpo_rollout_spec_c_peak_updates", "Online re-estimates of C_peak", spec.c_peak_updates)
            yield _gauge("fastgrpo_rollout_spec_alpha", "alpha: adaptive tree depth L = log2(N_verify / alpha) (live)", spec.alpha)
            ways = CounterMetricFamily("fastgrpo_rollout_spec_steps", "Steps with a tree, by the way they ran: with the "
                                       "draft head, the text chains alone, or plainly (measured faster)", labels=["way"])
            for way in ("head", "text", "plain"):
                ways.add_metric([way], getattr(spec, f"steps_{way}"))
            yield ways
            if "history" in spec.sources:
                yield _gauge("fastgrpo_rollout_draft_history_tokens", "Completion tokens the draft history holds "
                             "(--spec-history-tokens bounds it)", spec.history_tokens)
                yield _gauge("fastgrpo_rollout_draft_history_prompts", "Prompts the draft history holds completions of",
                             spec.history_prompts)
        if self._learner is not None:
            ls = self._learner.stats()
            yield _counter("fastgrpo_rollout_draft_rounds", "Online draft-learning rounds swapped in", ls.rounds)
            yield _counter("fastgrpo_rollout_draft_training_seconds", "Time the engine spent training the draft online",
                           ls.seconds)
            yield _gauge("fastgrpo_rollout_draft_buffer_bytes", "Bytes held by the draft-learning capture buffer",
                         ls.buffer_bytes)
            if math.isfinite(ls.last_loss):  # no loss before the first optimiser step
                yield _gauge("fastgrpo_rollout_draft_loss", "Draft loss of the latest online optimiser step",
                             ls.last_loss)

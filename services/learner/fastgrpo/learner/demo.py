"""`make demo`: the whole loop on one machine with the embedded defaults, speculation on.

Builds (or reuses) the fixture policy (--preset) and its draft head, and starts two rollout services
as their own processes on 127.0.0.1:
  * the speculative one the learner trains through: the draft head, adaptive trees (C_peak profiled
    once and kept beside the fixture), online draft learning, and drafts from the group's sibling
    samples and the prompt's earlier completions;
  * a plain one (no draft), the baseline: every step's prompts are generated there too, with the
    same sampling, from the same weights (pushed in full after each step, checksum-verified), and
    timed apart from the step.
Each step prints reward, accuracy, acceptance length (and accepted draft tokens by source), the
draft's version and the rollout tokens/s of both; the end prints rollout time with speculation
against the same steps' plain baseline, and the accuracy change. The learner trains on a small
prompt set (--train-size) so prompts come back every few steps, as in multi-epoch GRPO.

The fixture builder and the rollout service run as their own commands (`fastgrpo-fixture`,
`fastgrpo-rollout serve`), so the learner imports neither: they must be installed beside it, as
`make demo` does.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import transformers

from fastgrpo.client import RolloutClient
from fastgrpo.client.local import ServiceProcess
from fastgrpo.learner.config import DemoConfig, LearnerConfig
from fastgrpo.learner.loop import GRPOLearner, StepStats
from fastgrpo.learner.metrics import exported
from fastgrpo.learner.push import Pusher
from fastgrpo.learner.run import run_training

SOURCES = "head,siblings,history"


@dataclass(frozen=True)
class Baseline:
    """The plain service's generation of one step's prompts."""

    seconds: float
    tokens: int


def run_demo(demo: DemoConfig) -> int:
    transformers.logging.disable_progress_bar()  # the policy loads in a blink: no "Loading weights" bar
    t0 = time.perf_counter()
    model_dir = fixture_dir("build", demo.preset, demo.cache_dir)
    draft_dir = fixture_dir("draft", demo.preset, demo.cache_dir)
    print(f"fixture policy: {model_dir}\ndraft head: {draft_dir}", flush=True)
    Q, G = demo.prompts_per_step, demo.group_size
    calibration = Path(model_dir).parent / "calibration-demo.json"  # an entry per model, device and dtype
    if not calibration.exists():
        print("first run: profiling C_peak for the adaptive trees (at most 20 s; kept in "
              f"{calibration})", flush=True)
    # two cores: the services and the learner take turns (generation, then training), each may use both
    threads = max(1, os.cpu_count() or 1)
    spec_args = ["--max-running", str(Q * G), "--draft", draft_dir, "--spec-mode", "adaptive",
                 "--calibration", str(calibration), "--profile-budget-s", "20", "--draft-learning",
                 "--spec-sources", SOURCES]
    http = demo.rollout_http_port if demo.rollout_http_port >= 0 else None
    with ServiceProcess(model_dir, *spec_args, threads=threads, http_port=http) as service:
        status = _status(service.address)
        spec = status.speculation
        print(f"rollout service: pid {service.proc.pid} at {service.address}: draft v{status.draft_version}, "
              f"adaptive trees (C_peak {spec.c_peak:.0f}, {spec.c_peak_source}), online draft learning, "
              f"sources {spec.sources}", flush=True)
        if service.http_address:
            print(f"rollout service: http on {service.http_address}", flush=True)
        baseline = ServiceProcess(model_dir, "--max-running", str(Q * G), "--spec-mode", "off", threads=threads) \
            if demo.baseline else None
        try:
            if baseline is not None:
                print(f"plain baseline service: pid {baseline.proc.pid} at {baseline.address} (no draft)", flush=True)
            cfg = LearnerConfig(rollout=service.address, model=str(model_dir), steps=demo.steps, prompts_per_step=Q,
                                group_size=G, train_size=demo.train_size, eval_size=demo.eval_size,
                                http_port=demo.http_port)
            learner = DemoLearner(cfg, baseline.address if baseline else None)
            with exported(cfg.http_host, cfg.http_port) as metrics:
                summary = run_training(cfg, metrics=metrics, learner=learner, describe=learner.describe,
                                       progress=False)
            if learner.baseline is not None:
                learner.baseline.close()
        finally:
            if baseline is not None:
                baseline.stop()
    print(learner.summary(summary["steps"], summary["start_accuracy"], summary["end_accuracy"]), flush=True)
    print(f"demo done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


def _status(address: str):
    with RolloutClient(address) as client:
        return client.status()


class DemoLearner(GRPOLearner):
    """GRPO through the speculative service, and each step's prompts generated again by the
    plain service from the same weights: the baseline, timed apart from the step."""

    def __init__(self, cfg: LearnerConfig, baseline_address: str | None):
        super().__init__(cfg)
        self.baseline = self.baseline_pusher = None
        if baseline_address:
            self.baseline = RolloutClient(baseline_address, timeout=cfg.timeout)
            self.baseline_pusher = Pusher(self.baseline, self.model, lora=False, push_kind="full")
            self.baseline_pusher.check_in_sync()
        self.baselines: list[Baseline] = []
        self.speculation = self.client.status(timeout=cfg.timeout).speculation  # as of the latest step
        self._accepted = self._accepted_by_source(self.speculation)

    def _generate(self, prompts, G, sampling):
        batch = super()._generate(prompts, G, sampling)
        if self.baseline is not None:
            t0 = time.perf_counter()
            plain = self.baseline.generate_batch(prompts, G, sampling, timeout=self.cfg.timeout)
            self.baselines.append(Baseline(time.perf_counter() - t0, sum(len(c.token_ids) for c in plain.flat())))
        return batch

    def step(self) -> StepStats:
        stats = super().step()
        if self.baseline is not None:  # the step's generate time without the baseline's
            stats = dataclasses.replace(stats, generate_s=stats.generate_s - self.baselines[-1].seconds)
            pushed = self.baseline_pusher.push()
            if pushed.checksum != self.pusher.mirror.checksum:
                raise RuntimeError(f"the plain baseline serves checksum {pushed.checksum[:12]}, the speculative "
                                   f"service {self.pusher.mirror.checksum[:12]}: they no longer serve one policy")
        return stats

    @staticmethod
    def _accepted_by_source(spec) -> dict[str, int]:
        return {"head": spec.accepted_head, "siblings": spec.accepted_siblings, "history": spec.accepted_history}

    def describe(self, s: StepStats) -> str:
        status = self.client.status(timeout=self.cfg.timeout)
        self.speculation = status.speculation
        now = self._accepted_by_source(status.speculation)
        by_source = " ".join(f"{k} {now[k] - self._accepted[k]}" for k in now)
        self._accepted = now
        draft = status.draft_version
        line = (f"step {s.step:3d}/{self.cfg.steps} | reward {s.reward_mean:.3f} | acc {s.accuracy:.3f} "
                f"| accept {s.acceptance_length:.2f} ({by_source}) | draft v{draft} "
                f"| rollout {s.tokens_per_s:5.0f} tok/s")
        if self.baselines:
            b = self.baselines[-1]
            plain = b.tokens / max(b.seconds, 1e-9)
            line += f", plain {plain:5.0f} tok/s ({s.tokens_per_s / plain:.2f}x)"
        return line

    def summary(self, steps: list[StepStats], start_acc: float, end_acc: float) -> str:
        """The run's closing lines, from its steps (as step() returned them) and accuracies."""
        spec_s = sum(s.generate_s for s in steps)
        spec_tokens = sum(s.completion_tokens for s in steps)
        lines = [f"test accuracy {start_acc:.3f} -> {end_acc:.3f} "
                 f"({'improved' if end_acc > start_acc else 'did not improve'}, {end_acc - start_acc:+.3f})"]
        spec = self.speculation
        lines.append(f"speculative service's steps with a tree: {spec.steps_head} with the draft head, {spec.steps_text} "
                     f"with sibling/history text alone, {spec.steps_plain} plainly (each the way measured fastest "
                     f"at its batch size); draft tokens accepted: head {spec.accepted_head}, siblings "
                     f"{spec.accepted_siblings}, history {spec.accepted_history}")
        if self.baselines:
            plain_s = sum(b.seconds for b in self.baselines)
            plain_tokens = sum(b.tokens for b in self.baselines)
            spec_rate, plain_rate = spec_tokens / max(spec_s, 1e-9), plain_tokens / max(plain_s, 1e-9)
            lines.append(
                f"rollout over {len(steps)} steps: speculative {spec_s:.1f}s ({spec_tokens} tokens, "
                f"{spec_rate:.0f} tok/s), plain {plain_s:.1f}s ({plain_tokens} tokens, {plain_rate:.0f} tok/s): "
                f"{spec_rate / plain_rate:.2f}x the plain rollout's tokens/s, measured on the same prompts and "
                f"weights (samples differ: both are exact draws from the policy)")
        return "\n".join(lines)


def fixture_dir(command: str, preset: str, cache_dir: str | None) -> str:
    """The directory `fastgrpo-fixture build` (the policy) or `draft` (its draft head) prints last;
    its progress (and, on a first run, what it trains and for about how long) goes to stderr."""
    cmd = [sys.executable, "-m", "fastgrpo.fixture.cli", command, "--preset", preset]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(run_demo(DemoConfig()))

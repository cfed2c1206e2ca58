"""Benchmark plumbing that decides what a figure means (benchmarks measure; these check the method)."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
from conftest import tiny_config

from fastgrpo.bench.lockstep import Lockstep


class _Stepper:
    """Stands in for an engine's loop: `steps` steps, each entering engine.step_turn like Engine._loop."""

    def __init__(self, name: str, steps: int, seconds: float, log: list):
        self.name, self.steps, self.seconds, self.log = name, steps, seconds, log
        self.step_turn = contextlib.nullcontext
        self.hold_first = threading.Event()
        self.hold_first.set()

    def run(self) -> None:
        for i in range(self.steps):
            with self.step_turn():
                self.log.append((self.name, "in"))
                if i == 0:
                    self.hold_first.wait()
                time.sleep(self.seconds)
                self.log.append((self.name, "out"))


def test_lockstep_alternates_steps_and_counts_each_engine_its_own_time():
    log: list = []
    a, b = _Stepper("a", 4, 0.02, log), _Stepper("b", 2, 0.05, log)
    lock = Lockstep()
    lock.attach(a)
    lock.attach(b)
    threads = [threading.Thread(target=s.run) for s in (a, b)]
    a.hold_first.clear()  # a's first step lasts until b has asked for its turn
    threads[0].start()
    assert lock.wait_issued(1, 5.0)
    threads[1].start()
    assert lock.wait_issued(2, 5.0)
    assert not lock.wait_issued(3, 0.05)  # b waits for its turn while a steps
    a.hold_first.set()
    for t in threads:
        t.join()
    # one step at a time: every "in" is followed by the same engine's "out"
    assert all(log[i][1] == "in" and log[i + 1] == (log[i][0], "out") for i in range(0, len(log), 2))
    order = "".join(name for name, edge in log if edge == "in")
    assert order == "ababaa", order  # first come first served: they take turns while both have work
    assert 4 * 0.02 + 0.05 <= lock.seconds[id(a)] < 4 * 0.02 + 0.2  # its first step was held
    assert 2 * 0.05 <= lock.seconds[id(b)] < 2 * 0.05 + 0.1


def test_lockstep_generation_runs_real_engines_one_step_at_a_time():
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.bench.lockstep import lockstep_generation
    from fastgrpo.bench.spec import timed_generation
    from fastgrpo.rollout.engine.engine import Engine, EngineConfig
    from fastgrpo.rollout.engine.model_runner import ModelRunner
    from fastgrpo.rollout.engine.types import GenerationRequest, SamplingConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    engines = {mode: Engine(ModelRunner(model, 4), eos_token_ids=(0,), config=EngineConfig(max_running=4))
               for mode in ("off", "static")}  # no draft: both decode plainly, the same work
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    try:
        alone = timed_generation(engines["off"], prompts, 2, 1.0, 12, 3)
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=3)
        paired = lockstep_generation(engines, lambda mode: [GenerationRequest("t", tuple(map(tuple, prompts)), 2, sampling, mode)],
                                     first=1)
        assert all(e.step_turn is contextlib.nullcontext for e in engines.values())  # handed back
    finally:
        for e in engines.values():
            e.shutdown()
    for run in paired.values():
        assert run["tokens"] == alone["tokens"]
        assert 0 < run["seconds"] < run["wall_seconds"]
    # turns never overlap: the engines' own step times add up to no more than the paired run
    assert paired["off"]["seconds"] + paired["static"]["seconds"] <= paired["off"]["wall_seconds"]


@pytest.mark.parametrize("suite", ["spec", "concurrency", "calibrate", "drift"])
def test_every_suite_prints_its_help(suite, capsys):
    """argparse %-formats help texts: a literal % in one (the concurrency bench's --threads) once
    made --help crash."""
    from fastgrpo.bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([suite, "--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out

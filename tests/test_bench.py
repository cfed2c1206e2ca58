"""Benchmark plumbing that decides what a figure means (benchmarks measure; these check the method)."""
from __future__ import annotations

import contextlib
import subprocess
import threading

import pytest
from conftest import tiny_config

from fastgrpo.bench.lockstep import Lockstep

pytestmark = pytest.mark.unit


class _Clock:
    """A clock the steppers advance: step times are exact, whatever the machine does."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Stepper:
    """Stands in for an engine's loop: `steps` steps of `seconds` each (on the shared clock), each
    inside the turn the engine was given (as Engine._loop enters its step_turn)."""

    def __init__(self, name: str, steps: int, seconds: float, log: list, clock: _Clock):
        self.name, self.steps, self.seconds, self.log, self.clock = name, steps, seconds, log, clock
        self.step_turn = contextlib.nullcontext
        self.first_step_entered = threading.Event()
        self.hold_first = threading.Event()
        self.hold_first.set()
        self.after_hold = 0.0  # clock time the first step spends after its hold is released

    def set_step_turn(self, turn) -> None:
        self.step_turn = turn

    def run(self) -> None:
        for i in range(self.steps):
            with self.step_turn():
                self.log.append((self.name, "in"))
                if i == 0:
                    self.first_step_entered.set()
                    self.hold_first.wait()
                    self.clock.now += self.after_hold
                self.clock.now += self.seconds
                self.log.append((self.name, "out"))


def test_lockstep_alternates_steps_and_counts_each_engine_its_own_time():
    log: list = []
    clock = _Clock()
    a, b = _Stepper("a", 4, 0.02, log, clock), _Stepper("b", 2, 0.05, log, clock)
    lock = Lockstep(clock)
    lock.attach(a)
    lock.attach(b)
    threads = [threading.Thread(target=s.run) for s in (a, b)]
    # a's first step lasts until b has asked for its turn, and then 1 s more while b waits for it
    a.hold_first.clear()
    a.after_hold = 1.0
    threads[0].start()
    assert a.first_step_entered.wait(10)
    threads[1].start()
    assert lock.wait_issued(2, 10)  # b has asked for its turn while a steps
    a.hold_first.set()
    for t in threads:
        t.join()
    # one step at a time: every "in" is followed by the same engine's "out"
    assert all(log[i][1] == "in" and log[i + 1] == (log[i][0], "out") for i in range(0, len(log), 2)), log
    order = "".join(name for name, edge in log if edge == "in")
    assert order == "ababaa", order  # first come first served: they take turns while both have work
    # each engine is charged its own steps only: b's wait through a's long first step is not b's
    assert lock.seconds[id(a)] == pytest.approx(1.0 + 4 * 0.02)
    assert lock.seconds[id(b)] == pytest.approx(2 * 0.05)


def test_lockstep_generation_runs_real_engines_one_step_at_a_time():
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.bench.lockstep import lockstep_generation
    from fastgrpo.bench.spec import timed_generation
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    engines = {mode: Engine(ModelRunner(model), eos_token_ids=(0,), config=EngineConfig(max_running=4))
               for mode in ("off", "static")}  # no draft: both decode plainly, the same work
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    try:
        alone = timed_generation(engines["off"], prompts, 2, 1.0, 12, 3)
        sampling = Sampling(temperature=1.0, max_new_tokens=12, seed=3)
        paired = lockstep_generation(engines, lambda mode: [GenerationRequest("t", tuple(map(tuple, prompts)), 2, sampling, mode)],
                                     first=1)
        assert all(e._step_turn is contextlib.nullcontext for e in engines.values())  # handed back
    finally:
        for e in engines.values():
            e.shutdown()
    for run in paired.values():
        assert run["tokens"] == alone["tokens"]
        assert 0 < run["seconds"] < run["wall_seconds"]
    # turns never overlap: the engines' own step times add up to no more than the paired run
    assert paired["off"]["seconds"] + paired["static"]["seconds"] <= paired["off"]["wall_seconds"]


@pytest.mark.parametrize("suite", ["spec", "concurrency", "calibrate", "drift", "peers", "kv", "sources", "e2e", "push"])
def test_every_suite_prints_its_help(suite, capsys):
    """argparse %-formats help texts: a literal % in one (the concurrency bench's --threads) once
    made --help crash."""
    from fastgrpo.bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([suite, "--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.system  # runs git
def test_commit_is_dirty_for_changed_code_not_for_results_a_run_writes(tmp_path, monkeypatch):
    from fastgrpo.bench.common import commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    monkeypatch.delenv("FASTGRPO_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path / "benchmarks")  # the check covers the whole tree from wherever it runs
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"records": []}')
    assert commit() == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert commit() == head + "-dirty"

"""Behaviour pinned across refactors: greedy completions of the fixture policy, recorded before the
layered restructuring (commit d59e233, tests/data/greedy_on_the_fixture.json), through the engine
plain and speculative (static and adaptive trees), and through transformers' own generate.

The pinned tokens belong to one build of the fixture (its weights' checksum is recorded with them):
a machine whose CPU trains a different fixture compares against transformers only, and says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.rollout.speculative.controller import SpecController
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.wire.records import Sampling
from fastgrpo.wire.tensors import state_checksum, unique_state

pytestmark = pytest.mark.service

PINNED = json.loads((Path(__file__).parent / "data" / "greedy_on_the_fixture.json").read_text())


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    request = GenerationRequest("pinned", tuple(map(tuple, prompts)), 1, Sampling(temperature=0.0, max_new_tokens=48))
    return [r.token_ids for r in sorted(engine.submit(request), key=lambda r: r.prompt_index)]


def test_greedy_completions_on_the_fixture_are_pinned(fixture_dir, draft_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir)).eval()
    eos = model.config.eos_token_id
    prompts = PINNED["prompts"]
    head = DraftHead.load(draft_dir, model)
    outputs = {}
    engines = {"plain": Engine(ModelRunner(model), (eos,), EngineConfig(max_running=4))}
    for mode in ("static", "adaptive"):
        controller = SpecController(mode, static_tree=TreeShape(4, 5, 16))
        runner = ModelRunner(model, headroom=controller.max_nodes())
        drafter = Drafter(head)
        engines[mode] = Engine(runner, (eos,), EngineConfig(max_running=4), drafter, controller)
    try:
        for name, engine in engines.items():
            outputs[name] = _greedy(engine, prompts)
    finally:
        for engine in engines.values():
            engine.shutdown()
    with torch.no_grad():
        outputs["transformers"] = [
            model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=48, eos_token_id=eos,
                           pad_token_id=eos)[0, len(p):].tolist() for p in prompts]
    for name, completions in outputs.items():
        assert completions == outputs["transformers"], f"{name} differs from transformers' greedy generate"
    if state_checksum(unique_state(model.state_dict())) == PINNED["fixture_checksum"]:
        assert outputs["plain"] == PINNED["completions"], "greedy outputs moved since they were pinned"
    else:
        print("this machine built another fixture than the pinned one: compared with transformers only")

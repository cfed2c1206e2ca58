"""Learner against a real rollout service: steps move the served weights exactly as the learner's."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from fastgrpo.client import Completion, RolloutClient, Sampling, SpecStats
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.loop import GRPOLearner, fresh_groups
from fastgrpo.learner.push import served_names_state
from fastgrpo.learner.tasks import format_prompt, synthetic_math
from fastgrpo.wire.tensors import state_checksum

pytestmark = pytest.mark.service

SMALL = dict(prompts_per_step=4, group_size=4, max_new_tokens=40, eval_size=0, micro_batch=16, lr=2e-4)


def _config(address, model_dir, **kw):
    return LearnerConfig(rollout=address, model=str(model_dir), **{**SMALL, **kw})


def _greedy_local(model, tokenizer, prompts, max_new_tokens=40):
    """Greedy continuation computed by the learner's own model (HF generate)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out.append(gen[0, len(ids):].tolist())
    return out


def _check_served_equals_learner(learner, client, lora: bool):
    status = client.status()
    assert status.policy_version == learner.pusher.version >= 1
    assert status.policy_checksum == learner.pusher.mirror.checksum
    if not lora:  # full-parameter: the learner adopts the served values bit for bit
        assert state_checksum(served_names_state(learner.model, lora=False)) == status.policy_checksum
    tok = learner.tokenizer
    prompts = [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test[:6]]
    served = client.generate_batch(prompts, 1, Sampling(temperature=0.0, max_new_tokens=40))
    model = learner.model.merge_and_unload() if lora else learner.model
    local = _greedy_local(model, tok, prompts)
    for ids, group in zip(local, served.completions):
        # HF generate stops after EOS too; compare up to the served length
        assert group[0].token_ids == ids[: len(group[0].token_ids)]


@pytest.mark.parametrize("mode", ["dense_delta", "full", "lora"])
def test_grpo_step_moves_the_served_policy(fixture_dir, start_service, mode):
    app = start_service(fixture_dir, max_running=16)
    kw = {"lora": True, "lr": 2e-3} if mode == "lora" else {"push_kind": mode}
    learner = GRPOLearner(_config(f"127.0.0.1:{app.port}", fixture_dir, **kw))
    before = learner.client.status().policy_checksum
    for _ in range(4):  # a step whose groups all have equal rewards moves nothing and pushes nothing
        stats = learner.step()
        if stats.new_version == 1:
            break
    assert stats.completion_tokens > 0 and stats.new_version == 1
    assert learner.client.status().policy_checksum != before
    _check_served_equals_learner(learner, learner.client, lora=(mode == "lora"))


def test_checkpoint_resume_pushes_restored_weights(fixture_dir, start_service, tmp_path):
    app = start_service(fixture_dir, max_running=16)
    cfg = _config(f"127.0.0.1:{app.port}", fixture_dir, output_dir=str(tmp_path), steps=1)
    first = GRPOLearner(cfg)
    first.step()
    from fastgrpo.learner.checkpoint import save_checkpoint

    save_checkpoint(first, tmp_path)
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    order = list(first.order)
    # a fresh service (version 0, the fixture's weights) and a resumed learner
    app2 = start_service(fixture_dir, max_running=16)
    resumed = GRPOLearner(dataclasses.replace(cfg, rollout=f"127.0.0.1:{app2.port}", resume=True))
    assert resumed.step_index == 1 and resumed.order == order
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert resumed.client.status().policy_checksum == resumed.pusher.mirror.checksum
    resumed.step()
    assert resumed.step_index == 2


def test_learner_refuses_a_service_with_other_weights(fixture_dir, tiny_dir, start_service):
    app = start_service(tiny_dir)
    with pytest.raises(RuntimeError, match="different weights"):
        GRPOLearner(_config(f"127.0.0.1:{app.port}", fixture_dir))


@pytest.mark.unit
def test_fresh_groups_drops_stale_groups_whole():
    def c(v):
        return Completion("r", 0, 0, [1], [0.0], "stop", v, SpecStats(), "")

    groups = [[c(5), c(5)], [c(5), c(3)], [c(4), c(4)]]
    assert fresh_groups(groups, version=5, max_staleness=0) == [0]
    assert fresh_groups(groups, version=5, max_staleness=1) == [0, 2]
    assert fresh_groups(groups, version=5, max_staleness=2) == [0, 1, 2]


def test_two_processes_run_two_grpo_steps(fixture_dir, service_process):
    """The rollout service and the learner as two OS processes talking gRPC on 127.0.0.1."""
    service = service_process(fixture_dir, "--max-running", "16")
    cmd = [sys.executable, "-m", "fastgrpo.learner.cli", "train", "--rollout", service.address,
           "--model", str(fixture_dir), "--steps", "2", "--prompts-per-step", "8", "--group-size", "4",
           "--max-new-tokens", "40", "--eval-size", "0", "--lr", "2e-4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = re.findall(r"step +(\d+) \| v(\d+)->v(\d+)", done.stdout)
    assert [int(s[0]) for s in steps] == [1, 2], done.stdout
    # a step whose every group had equal rewards changes nothing and pushes nothing
    assert int(steps[-1][2]) >= 1
    with RolloutClient(service.address) as client:
        assert client.status().policy_version == int(steps[-1][2])

"""Online draft learning over real gRPC: capture, TrainDraft rounds, recovery after a policy shift."""
from __future__ import annotations

import math

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.client import RolloutClient, Sampling, WeightMirror
from fastgrpo.learner.tasks import format_prompt, synthetic_math
from fastgrpo.rollout.draft_learning.buffer import CaptureBuffer
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc

pytestmark = pytest.mark.service


@pytest.mark.unit
def test_capture_buffer_is_bounded_oldest_first():
    seq = lambda n: FeatureSequence(torch.zeros(n, dtype=torch.long), torch.zeros(n, 4))  # noqa: E731
    one = seq(10).nbytes()
    buf = CaptureBuffer(max_bytes=3 * one)
    for _ in range(5):
        buf.add(seq(10))
    st = buf.stats()
    assert (st.sequences, st.bytes, st.dropped_sequences, st.added_sequences) == (3, 3 * one, 2, 5)
    assert len(buf.since(3)) == 2 and len(buf.since(0)) == 3


class _TickingClock:
    """Each reading is `tick` seconds after the one before: every optimiser step (read before and
    after) costs exactly one tick, however busy the machine is."""

    def __init__(self, tick: float):
        self.tick, self.now = tick, 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.unit
def test_scheduled_rounds_stay_within_their_time_budget(tiny_dir):
    """time_fraction bounds scheduled training by the serving time the engine credits; forced
    (TrainDraft) rounds are not bounded. Real optimiser steps on the tiny model's draft, timed by a
    clock on which each step costs exactly 1/64 s (a binary fraction: the budget sums stay exact)."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.rollout.draft_learning.online import DraftLearningConfig, OnlineDraftLearner
    from fastgrpo.rollout.service.weights import WeightStore

    target = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).requires_grad_(False)
    head = DraftHead.for_target(target)
    step_s = 2.0**-6
    learner = OnlineDraftLearner(head, WeightStore(head), DraftLearningConfig(batch_size=1, max_steps=8,
                                                                              time_fraction=0.25),
                                 clock=_TickingClock(step_s))
    H = target.config.hidden_size

    def capture(n):
        for _ in range(n):
            learner.capture(FeatureSequence(torch.randint(0, 90, (16,)), torch.randn(16, H)))

    def run_round(force=False):
        fut = learner.schedule(force)
        steps = 0
        while learner.has_work():
            learner.step()
            steps += 1
        assert fut.done()
        return steps

    capture(8)
    assert run_round() == 1  # no step cost measured yet: one step, to measure it
    assert learner._step_s == pytest.approx(step_s)
    capture(8)
    assert run_round() == 0  # nothing served since: that step is still owed
    capture(8)
    assert run_round(force=True) == 8  # an explicit round is not bounded (but its time counts)
    learner.credit(4 * 9 * step_s)  # a quarter of it pays off the 9 steps taken: nothing left
    capture(8)
    assert run_round() == 0
    learner.credit(4 * 3 * step_s)  # serving that pays for 3 steps buys 3
    capture(8)
    assert run_round() == 3
    learner.credit(4 * 100 * step_s)  # a long serving stretch buys at most one full round
    capture(8)
    assert run_round() == 8


def _acceptance(client, prompts) -> float:
    batch = client.generate_batch(prompts, 1, Sampling(temperature=0.0, max_new_tokens=48))
    done = batch.flat()
    for c in done:  # per-depth counts add up, and depth d+1 is only reached through depth d
        per_depth = c.spec.accepted_per_depth
        assert sum(per_depth) == c.spec.accepted_tokens
        assert all(a >= b for a, b in zip(per_depth, per_depth[1:]))
    steps = sum(c.spec.verify_steps for c in done)
    return sum(len(c.token_ids) - 1 for c in done) / max(steps, 1)


def _train(client, rounds):
    reply = None
    for _ in range(rounds):
        reply = client.train_draft(run_now=True, timeout=300)
    return reply


@pytest.fixture
def learning_service(fixture_dir, start_service, tmp_path):
    """The fixture policy served with a *random* draft head, learning only on TrainDraft."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(fixture_dir))
    torch.manual_seed(0)
    DraftHead.for_target(target).save(tmp_path / "draft")
    # no warm-up: it protects a trained head from a cold AdamW's first steps, and this one is random;
    # the test's three short rounds (8 steps each) would spend most of their steps warming up
    app = start_service(fixture_dir, draft=str(tmp_path / "draft"), max_running=32, draft_every_n_batches=0,
                        draft_lr=1e-3, draft_max_steps=32, draft_warmup_steps=0, spec_mode="static", spec_width=4, spec_depth=4,
                        spec_n_verify=12)
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    yield app, RolloutClient(f"127.0.0.1:{app.port}"), pb_grpc.RolloutServiceStub(channel)
    channel.close()


def test_draft_learns_from_scratch_and_recovers_after_a_policy_shift(learning_service, fixture_dir):
    app, client, stub = learning_service
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(fixture_dir))
    problems = synthetic_math(seed=0)
    train_prompts = [tok(format_prompt(p.question))["input_ids"] for p in problems.train[:64]]
    eval_prompts = [tok(format_prompt(p.question))["input_ids"] for p in problems.test[:16]]

    before = stub.TrainDraft(pb.TrainDraftRequest(), timeout=30)
    assert before.rounds == 0 and math.isnan(before.last_loss)
    random_acc = _acceptance(client, eval_prompts)
    for _ in range(3):  # capture: rollouts of train prompts, then a round on them
        client.generate_batch(train_prompts, 2, Sampling(temperature=1.0, max_new_tokens=48, seed=1))
        reply = _train(client, 1)
    assert reply.rounds == 3 and reply.draft_version == 3 and reply.samples_seen > 0
    assert client.status().draft_version == 3
    learned_acc = _acceptance(client, eval_prompts)
    assert learned_acc > random_acc + 0.5, (random_acc, learned_acc)

    # shift the policy: rescale every feature dimension of the final norm by exp(z), z ~ N(0, 1);
    # the target's next-token distribution moves (its greedy outputs change) and its features no
    # longer look like the ones the draft learned
    status = client.status()
    weights = load_file(str(fixture_dir / "model.safetensors"))
    w = weights["model.norm.weight"]
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    mirror = WeightMirror.of(weights, status.model.dtype)
    client.push_weights({"model.norm.weight": w * (torch.exp(z) - 1)}, "dense_delta", mirror=mirror)
    shifted_acc = _acceptance(client, eval_prompts)
    assert shifted_acc < learned_acc - 0.3, (learned_acc, shifted_acc)

    for _ in range(3):
        client.generate_batch(train_prompts, 2, Sampling(temperature=1.0, max_new_tokens=48, seed=2))
        _train(client, 1)
    recovered_acc = _acceptance(client, eval_prompts)
    assert recovered_acc > shifted_acc + 0.3, (shifted_acc, recovered_acc)


def test_train_draft_errors(learning_service, tiny_dir, start_service):
    _, _, stub = learning_service
    with pytest.raises(grpc.RpcError) as err:
        stub.TrainDraft(pb.TrainDraftRequest(set_policy=True, every_n_batches=-1), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "every_n_batches" in err.value.details()
    reply = stub.TrainDraft(pb.TrainDraftRequest(set_policy=True, every_n_batches=3), timeout=10)
    assert reply.every_n_batches == 3
    client = RolloutClient(learning_service[1].replicas[0].address)
    assert client.train_draft(every_n_batches=0).every_n_batches == 0
    with pytest.raises(ValueError, match="every_n_batches"):
        client.train_draft(every_n_batches=-2)
    plain = start_service(tiny_dir)
    plain_stub = pb_grpc.RolloutServiceStub(grpc.insecure_channel(f"127.0.0.1:{plain.port}"))
    with pytest.raises(grpc.RpcError) as err:
        plain_stub.TrainDraft(pb.TrainDraftRequest(run_now=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

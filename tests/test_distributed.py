"""The learner under torchrun: 2 CPU ranks (gloo, FSDP2) update as 1 process does on the whole batch;
only rank 0 talks to the rollout service; a sharded checkpoint resumes at another world size.

This file is also the ranks' program: `torchrun ... tests/test_distributed.py update|train ...`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.service

# (loss mode, KL beta): every aggregation's normaliser, and the reference forward
VARIANTS = [("grpo", 0.0), ("dapo", 0.0), ("dr_grpo", 0.04)]
# one Adam step moves each weight by about lr whatever the gradient's scale, so the gradients are
# compared too: a rank summing where it should average (or the reverse) shows only there
LR = 1e-4


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


# ---------------------------------------------------------------- the update, without a rollout service
def _fixed_batch(fixture_dir: Path) -> dict:
    """4 prompts x 4 sampled completions of the fixture, old logprobs a little off its own (so ratios
    clip), and advantages with zeros that leave the two ranks different numbers of micro-batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.learner.algo import group_advantages
    from fastgrpo.learner.policy import SequenceBatch, completion_logprobs
    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    tok = AutoTokenizer.from_pretrained(fixture_dir)
    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompts, completions = [], []
    for problem in synthetic_math(seed=0).train[:4]:
        ids = tok(format_prompt(problem.question))["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=40, num_return_sequences=4,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in out[:, len(ids):].tolist():
            end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            prompts.append(ids)
            completions.append(row[:end])
    mb = SequenceBatch.build(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        own = completion_logprobs(model, mb, 1.0)  # (16, T)
    noisy = own + 0.3 * torch.randn(own.shape)  # (16, T)
    logprobs = [noisy[i, : len(c)].tolist() for i, c in enumerate(completions)]
    # group 1 all equal: no advantage; group 2's middle rewards equal its mean: rows 9 and 11 (rank
    # 1's) have none either, so rank 1 has 4 sequences to train on and rank 0 has 6
    rewards = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 0.5, 0, 0.5, 1, 1, 0, 1], dtype=torch.float32)  # (16,)
    advantages = group_advantages(rewards, 4, "group")  # (16,)
    assert (advantages == 0).tolist() == [False] * 4 + [True] * 4 + [False, True, False, True] + [False] * 4
    return {"prompts": prompts, "completions": completions, "logprobs": logprobs, "advantages": advantages.tolist(),
            "pad_id": tok.pad_token_id}


def run_updates(fixture_dir: str, batch_file: str, out_dir: str) -> None:
    """Two GRPOLearner._train updates per variant on the batch; rank 0 writes the full weights and
    the second update's gradients (safetensors) and figures (JSON)."""
    from safetensors.torch import save_file

    from fastgrpo.learner.config import LearnerConfig
    from fastgrpo.learner.distributed import TrainBatch, full_value, init_world
    from fastgrpo.learner.loop import GRPOLearner

    data = json.loads(Path(batch_file).read_text())
    batch = TrainBatch(data["prompts"], data["completions"], data["logprobs"], torch.tensor(data["advantages"]))
    for mode, beta in VARIANTS:
        # the update alone: a learner without its rollout client, tasks or pusher
        learner = GRPOLearner.__new__(GRPOLearner)
        learner.cfg = LearnerConfig(model=fixture_dir, loss_mode=mode, beta=beta, lr=LR, micro_batch=2,
                                    max_new_tokens=40, grad_clip=0.1)
        learner.world = init_world("cpu")
        learner.pad_id = data["pad_id"]
        learner._build_policy()
        learner._train(batch)
        # a second update on the same batch: the policy has left the reference (KL > 0), Adam has state
        loss, kl, clip, grad_norm = learner._train(batch)
        grads = {f"grad.{n}": full_value(p.grad).detach().clone() for n, p in learner.model.named_parameters()}
        learner._weights_to_pusher()
        if learner.world.is_main:
            params = {f"param.{n}": t.detach().clone() for n, t in learner.push_model.state_dict().items()}
            save_file({**params, **grads}, str(Path(out_dir) / f"{mode}.safetensors"))
            figures = {"loss": loss, "kl": kl, "clip": clip, "grad_norm": grad_norm}
            (Path(out_dir) / f"{mode}.json").write_text(json.dumps(figures))


def test_two_ranks_update_as_one_process_on_the_whole_batch(fixture_dir, tmp_path):
    from safetensors.torch import load_file

    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps(_fixed_batch(fixture_dir)))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_updates(str(fixture_dir), str(batch_file), str(one))
    _torchrun("update", str(fixture_dir), str(batch_file), str(two))
    original = load_file(str(Path(fixture_dir) / "model.safetensors"))
    for mode, _ in VARIANTS:
        a, b = load_file(str(one / f"{mode}.safetensors")), load_file(str(two / f"{mode}.safetensors"))
        assert a.keys() == b.keys()
        moved = 0.0
        for name in a:
            if name.startswith("param."):
                assert (a[name] - b[name]).abs().max() <= 1e-5, (mode, name)
                if name[6:] in original:
                    moved = max(moved, float((a[name] - original[name[6:]]).abs().max()))
            else:
                torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")
        assert moved > 0.5 * LR  # the update is far larger than the tolerance
        fa, fb = json.loads((one / f"{mode}.json").read_text()), json.loads((two / f"{mode}.json").read_text())
        assert fa["grad_norm"] > 0.1 and fa["clip"] > 0  # gradient clipping and ratio clipping were on
        assert (fa["kl"] > 0) == (mode == "dr_grpo")
        for key in fa:
            assert fb[key] == pytest.approx(fa[key], rel=1e-5, abs=1e-7), (mode, key)


# ---------------------------------------------------------------- against a real rollout service
def train_marking_channels(marker_dir: str, argv: list[str]) -> int:
    """`fastgrpo-learner train argv`, with every gRPC channel this rank opens noted in
    `<marker_dir>/channels.rank<RANK>`."""
    import grpc

    path = Path(marker_dir) / f"channels.rank{os.environ['RANK']}"
    for module in (grpc, grpc.aio):
        for name in ("insecure_channel", "secure_channel"):
            def opened(target, *args, _open=getattr(module, name), **kwargs):
                with path.open("a") as f:
                    f.write(f"{target}\n")
                return _open(target, *args, **kwargs)

            setattr(module, name, opened)
    from fastgrpo.learner.cli import main

    return main(["train", *argv])


def test_torchrun_learner_trains_pushes_from_rank0_and_resumes_in_one_process(fixture_dir, service_process, tmp_path):
    from safetensors.torch import load_file

    from fastgrpo.client import RolloutClient
    from fastgrpo.learner.checkpoint import save_checkpoint
    from fastgrpo.learner.config import LearnerConfig
    from fastgrpo.learner.loop import GRPOLearner

    service = service_process(fixture_dir, "--max-running", "16")
    out = tmp_path / "run"
    args = dict(rollout=service.address, model=str(fixture_dir), steps=2, prompts_per_step=4, group_size=4,
                max_new_tokens=32, eval_size=0, lr=2e-4, output_dir=str(out))
    argv = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    done = _torchrun("train", str(tmp_path), *argv)
    steps = [tuple(map(int, s)) for s in re.findall(r"step +(\d+) \| v(\d+)->v(\d+)", done.stdout)]
    assert steps == [(1, 0, 1), (2, 1, 2)], done.stdout  # one line a step: rank 1 prints nothing
    with RolloutClient(service.address) as client:
        served = client.status()
    assert served.policy_version == 2  # one push a step: rank 0's
    # rank 0's client: channels to the one replica only (a call channel and a fail-fast one)
    assert set((tmp_path / "channels.rank0").read_text().split()) == {service.address}
    assert not (tmp_path / "channels.rank1").exists()  # rank 1 never opened a gRPC channel

    checkpoint = out / "step-2"
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # one file per rank
    learner = GRPOLearner(LearnerConfig(**{**args, "resume": True}))  # world size 1
    assert learner.world.size == 1 and learner.step_index == 2
    full = load_file(str(checkpoint / "model" / "model.safetensors"))  # rank 0's gathered weights
    state = learner.model.state_dict()
    assert full and all(torch.equal(state[name], t) for name, t in full.items())
    assert len(learner.optimizer.state) == len(list(learner.model.parameters()))
    assert all(s["exp_avg"].abs().sum() > 0 for s in learner.optimizer.state.values())
    # the resumed learner pushed its weights in full: they are the ones the 2-rank run left served
    assert learner.client.status().policy_checksum == served.policy_checksum

    # and back: a one-process checkpoint (model/ + optimizer.pt) resumed by 2 ranks, re-saved sharded
    learner.step()  # step 3, version 4
    save_checkpoint(learner, out)
    assert not (out / "step-3" / "sharded").exists()
    learner.client.close()
    (tmp_path / "back").mkdir()
    _torchrun("train", str(tmp_path / "back"), *argv, "--steps", "3", "--resume")  # resumes, takes no step
    with RolloutClient(service.address) as client:
        again = client.status()
    assert again.policy_version == 5 and again.policy_checksum == learner.pusher.mirror.checksum  # rank 0's full push
    assert (out / "step-3" / "sharded").is_dir()
    resumed = GRPOLearner(LearnerConfig(**{**args, "resume": True}))
    for name, t in learner.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], t), name
    for (p, s), (q, r) in zip(learner.optimizer.state.items(), resumed.optimizer.state.items()):
        assert torch.equal(s["exp_avg"], r["exp_avg"]) and torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])
        assert float(s["step"]) == float(r["step"]) == 3
    resumed.client.close()


if __name__ == "__main__":
    if sys.argv[1] == "update":
        run_updates(*sys.argv[2:5])
    elif sys.argv[1] == "train":
        sys.exit(train_marking_channels(sys.argv[2], sys.argv[3:]))

"""Draft head: training pass equals the serving pass, persistence, loss, learning on real features."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.draft_learning.loss import draft_loss
from fastgrpo.rollout.draft_learning.offline import capture_features
from fastgrpo.rollout.draft_learning.trainer import DraftTrainConfig, DraftTrainer, batch_sequences, windows
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval().requires_grad_(False)


def test_training_pass_equals_serving_pass(target):
    torch.manual_seed(1)
    head = DraftHead.for_target(target).eval()
    tokens = torch.randint(0, 97, (2, 7))
    feats = torch.randn(2, 7, 64)
    counts = torch.tensor([7, 4])
    valid = torch.arange(7)[None, :] < counts[:, None]
    with torch.no_grad():
        train_out = head(tokens, feats, torch.arange(7)[None].expand(2, 7), valid)  # (2, 7, H)
    drafter = Drafter(head)
    drafter.allocate_cache(num_blocks=16, block_size=4)
    tables = torch.tensor([[3, 9], [5, 2]])  # blocks out of order: the draft reads through its tables
    serve_last = drafter.catch_up(tables, torch.tensor([0, 0]), tokens, feats, counts)  # (2, H)
    assert torch.allclose(serve_last[0], train_out[0, 6], atol=1e-5)
    assert torch.allclose(serve_last[1], train_out[1, 3], atol=1e-5)
    # catching up in two pieces gives the same as one piece
    drafter.catch_up(torch.tensor([[7, 1]]), torch.tensor([0]), tokens[:1, :3], feats[:1, :3], torch.tensor([3]))
    rest = drafter.catch_up(torch.tensor([[7, 1]]), torch.tensor([3]), tokens[:1, 3:], feats[:1, 3:], torch.tensor([4]))
    assert torch.allclose(rest[0], train_out[0, 6], atol=1e-5)


def test_save_load_roundtrip_shares_target_modules(target, tmp_path):
    head = DraftHead.for_target(target)
    head.save(tmp_path / "d", meta={"x": 1})
    loaded = DraftHead.load(tmp_path / "d", target)
    for (k, a), (k2, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.lm_head is target.lm_head and loaded.embed_tokens is target.model.embed_tokens
    assert not any(k.startswith(("lm_head", "embed")) for k in loaded.state_dict())
    other = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=50))
    with pytest.raises(ValueError, match="vocab_size"):
        DraftHead.load(tmp_path / "d", other)


def test_draft_loss_by_hand():
    lm_head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    target = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    pred = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    valid = torch.tensor([[True, False]])
    out = draft_loss(pred, target, lm_head, valid, feature_weight=2.0, ce_weight=0.1)
    # position 0 only: smooth-L1 per element = [0.5 (|1|->0.5), 0] -> mean 0.25
    assert abs(float(out.feature_loss) - 0.25) < 1e-6
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    q = torch.log_softmax(torch.tensor([1.0, 0.0, 0.0]), 0)
    assert abs(float(out.ce_loss) - float(-(p * q).sum())) < 1e-6
    assert abs(float(out.loss.detach()) - (2.0 * 0.25 + 0.1 * float(out.ce_loss))) < 1e-6
    assert float(out.top1) == 1.0
    out.loss.backward()
    assert pred.grad[0, 1].abs().sum() == 0  # padding position gets no gradient


def test_windows_cover_every_target():
    seq = FeatureSequence(torch.arange(10), torch.randn(10, 4), start=5)
    ws = windows(seq, 4)
    assert [w.start for w in ws] == [5, 8, 11]
    assert [len(w.tokens) for w in ws] == [4, 4, 4]
    assert torch.equal(torch.cat([ws[0].tokens, ws[1].tokens[1:], ws[2].tokens[1:]]), seq.tokens)


def test_prompt_pairs_are_context_not_targets():
    """An online capture trains only from the prompt's last pair on (the pair whose prediction is the
    first token a draft ever proposes); earlier pairs stay in as context, also across windows."""
    seq = FeatureSequence(torch.arange(10), torch.randn(10, 4), start=0, loss_from=6)
    *_, valid, has_target = batch_sequences([seq], "cpu", torch.float32)
    assert has_target[0].tolist() == [False] * 6 + [True] * 3 + [False]  # the last pair has no f_{i+1}
    assert valid[0].all()
    assert [w.loss_from for w in windows(seq, 4)] == [6, 3, 0]  # windows start at pairs 0, 3, 6


def test_engine_captures_start_the_loss_at_the_prompts_last_pair():
    from fastgrpo.rollout.speculative.spec_step import SpecDecoder, SpecState

    st = SpecState()
    SpecDecoder.after_prefill(st, (5, 6, 7, 8), 9, torch.randn(4, 3), prompt_len=4)
    SpecDecoder.queue_pair(st, torch.randn(1, 3), 10)
    cap = SpecDecoder.captured(st)
    assert cap.tokens.tolist() == [6, 7, 8, 9, 10] and cap.loss_from == 3


def test_trainer_learns_real_target_features(target):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 97, (12,), generator=g).tolist() for _ in range(8)]
    data = capture_features(target, seqs)
    head = DraftHead.for_target(target)
    trainer = DraftTrainer(head, DraftTrainConfig(lr=3e-3))
    first = trainer.step(data)
    for _ in range(60):
        last = trainer.step(data)
    assert float(last.loss) < 0.5 * float(first.loss)
    assert all(p.grad is None for p in target.parameters())  # the shared target modules never train


def test_warmup_ramps_the_learning_rate_and_softens_the_first_steps(target):
    """With warm-up the first optimiser step moves the head's weights by 1/warmup of what a cold
    AdamW step moves them (AdamW's first step is ~lr per weight whatever the gradient)."""
    g = torch.Generator().manual_seed(4)
    data = capture_features(target, [torch.randint(1, 97, (12,), generator=g).tolist() for _ in range(4)])

    def first_move(warmup: int) -> tuple[float, list[float]]:
        torch.manual_seed(5)
        head = DraftHead.for_target(target)
        before = [p.detach().clone() for p in head.parameters()]
        trainer = DraftTrainer(head, DraftTrainConfig(lr=1e-3, warmup_steps=warmup))
        trainer.step(data)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(head.parameters(), before))
        lrs = []
        for _ in range(5):
            trainer.step(data)
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return moved, lrs

    cold, cold_lrs = first_move(0)
    warm, warm_lrs = first_move(4)
    assert cold_lrs == [1e-3] * 5
    assert warm_lrs == pytest.approx([5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # steps 2..6 of a 4-step ramp
    assert warm == pytest.approx(cold / 4, rel=0.05)


@pytest.mark.system
def test_train_draft_cli_writes_a_loadable_head(tiny_dir, tmp_path):
    from fastgrpo.rollout.service.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"token_ids": [1, 2, 3]}\n{"token_ids": [4, 5]}\n\n{"token_ids": [9, 9, 9, 9]}\n')
    out = tmp_path / "draft"
    rc = main(["train-draft", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out),
               "--epochs", "1", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--batch-size", "4"])
    assert rc == 0
    target = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    head = DraftHead.load(out, target)
    assert sum(p.numel() for p in head.parameters()) > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        main(["train-draft", "--model", str(tiny_dir), "--prompts", str(bad), "--out", str(out)])

"""CPU linears through oneDNN's packed weights (runtime.packed) and the gather backend's reused
buffers (runtime.kv_cache): the same numbers as the plain ops, and never stale.

  * `layers.project` in inference equals `F.linear` at every row count and shape, and outside
    inference it is the plain, differentiable module;
  * a weight changed in place (as a WeightStore commit or the draft learner's swap changes it) is
    repacked on the next call, eager and inside a compiled graph, with no recompile;
  * the gather backend's attention equals a reference over the whole pool, for calls of different
    sizes one after another (one reused buffer), in chunks, and in and out of inference mode.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastgrpo.rollout.runtime.kv_cache as kv_cache
from fastgrpo.rollout.runtime import packed
from fastgrpo.rollout.runtime.kv_cache import PagedKVCache
from fastgrpo.rollout.runtime.layers import project

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not packed.ONEDNN, reason="this torch build has no oneDNN (mkldnn)")]


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """Every test starts untuned (the packed op at every row count), whatever an engine built
    earlier in this process measured; a test's own tuning goes with it."""
    monkeypatch.setattr(packed, "_PACKED_ROWS", {})


def _linear(out_features: int, in_features: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (64, 48), (3, 7, 48), (2, 1, 48)])
def test_project_in_inference_equals_linear(shape):
    lin = _linear(80, 48)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = project(lin, x)
        want = F.linear(x, lin.weight, lin.bias)
    assert id(lin.weight) in packed._PACKED  # it did take the packed path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tune_records_the_faster_way_per_row_count_and_project_takes_it(monkeypatch):
    linears = [_linear(96, 48, seed=i) for i in range(4)]
    # a bounded pass: the first linears up to TUNE_BYTES of weights (here two of the four)
    monkeypatch.setattr(packed, "TUNE_BYTES", 2 * 96 * 48 * 4)
    seconds = packed.tune(linears, repeats=1)
    assert seconds > 0 and set(packed._PACKED_ROWS) == set(packed.TUNE_ROWS)
    assert [id(m.weight) in packed._PACKED for m in linears] == [True, True, False, False]
    # a choice each way: project equals F.linear either way, and the packed copy is made only where it is taken
    packed._PACKED_ROWS.update({1: False, 2: True})
    assert not packed.packed_rows(1) and packed.packed_rows(2) and packed.packed_rows(10**6) == packed._PACKED_ROWS[64]
    for rows, takes_packed in ((1, False), (2, True)):
        lin = _linear(80, 48, seed=rows)
        x = torch.randn(rows, 48)
        with torch.inference_mode():
            got = project(lin, x)
        assert (id(lin.weight) in packed._PACKED) == takes_packed
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_a_remembered_choice_is_read_instead_of_timed_and_a_bad_one_timed_again(tmp_path, monkeypatch):
    linears = [_linear(96, 48, seed=i) for i in range(2)]
    path = packed.choice_path(linears, root=tmp_path)
    assert path.parent == tmp_path / "linears" and not path.exists()
    assert packed.tune(linears, repeats=1, remember=path) > 0
    first = dict(packed._PACKED_ROWS)
    assert json.loads(path.read_text()) == {str(r): c for r, c in first.items()}

    def no_timing(*_):
        raise AssertionError("timed although a choice is remembered")

    monkeypatch.setattr(packed, "_timed_choice", no_timing)
    flipped = {r: not c for r, c in first.items()}  # (as another start's timing might have chosen)
    path.write_text(json.dumps({str(r): c for r, c in flipped.items()}))
    packed._PACKED_ROWS.clear()
    packed.tune(linears, remember=path)
    assert packed._PACKED_ROWS == flipped  # the file's choice, not a new timing
    path.write_text('{"1": true}')  # unreadable as a choice (row counts missing): timed again, rewritten
    monkeypatch.setattr(packed, "_timed_choice", lambda *_: first)
    packed.tune(linears, remember=path)
    assert packed._PACKED_ROWS == first and json.loads(path.read_text())["1"] == first[1]
    # the key: the shapes (and the thread count) make another file; the same linears the same one
    assert packed.choice_path([_linear(80, 48)], root=tmp_path) != path
    assert packed.choice_path([_linear(96, 48, seed=7), _linear(96, 48, seed=8)], root=tmp_path) == path
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert packed.choice_path(linears, root=tmp_path) != path
    finally:
        torch.set_num_threads(threads)


def test_an_engine_tunes_its_linears_by_default_and_remembers_the_choice(tiny_dir, tmp_path, monkeypatch):
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig

    monkeypatch.setenv("FASTGRPO_CACHE", str(tmp_path))
    runner = ModelRunner.load(tiny_dir, torch.float32, "cpu")
    assert EngineConfig().cpu_linears == "tuned"
    for linears, tuned in (("tuned", True), ("packed", False)):
        engine = Engine(runner, (0,), EngineConfig(max_running=2, cpu_linears=linears))
        try:
            assert bool(packed._PACKED_ROWS) == tuned  # packed: no table, every row count the packed op
        finally:
            engine.shutdown()
    remembered = list((tmp_path / "linears").glob("*.json"))
    assert len(remembered) == 1  # the tuned engine's choice, for the next start on this machine
    with pytest.raises(ValueError, match="--cpu-linears must be packed or tuned"):
        Engine(runner, (0,), EngineConfig(max_running=2, cpu_linears="fast"))


def test_project_with_autograd_is_the_plain_differentiable_linear():
    lin = _linear(8, 6)
    x = torch.randn(3, 6, requires_grad=True)
    project(lin, x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert id(lin.weight) not in packed._PACKED


def test_a_weight_changed_in_place_is_repacked():
    lin = _linear(32, 16)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        before = project(lin, x)
        served = lin.state_dict()["weight"]  # what WeightStore holds: a detached alias of the parameter
        served.copy_(torch.randn_like(served))  # a commit
        after = project(lin, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_a_packed_copy_goes_with_its_weight():
    lin = _linear(16, 8)
    with torch.inference_mode():
        project(lin, torch.randn(2, 8))
    key = id(lin.weight)
    assert key in packed._PACKED
    del lin
    assert key not in packed._PACKED


@pytest.mark.system  # torch.compile runs the C++ compiler, a subprocess
def test_a_compiled_graph_reads_the_current_packed_weight_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    lin = _linear(64, 32)
    x = torch.randn(9, 32)  # more rows than GEMV_ROWS: the packed op, not the multiply-reduce

    def step(x):
        return torch.relu(project(lin, x))

    compiled = torch.compile(step, fullgraph=True)
    with torch.inference_mode():
        first = compiled(x)
        torch.testing.assert_close(first, step(x), rtol=1e-5, atol=1e-5)
        lin.weight.copy_(torch.randn_like(lin.weight))
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        second = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, torch.relu(F.linear(x, lin.weight, lin.bias)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the gather backend's buffers
HKV, HQ, D, BS, BLOCKS = 2, 4, 8, 4, 40


def _reference(cache: PagedKVCache, q: torch.Tensor, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention over the rows' blocks read with plain indexing, no buffer."""
    B, nb = table.shape
    k = cache.k[0][:, table].reshape(HKV, B, nb * BS, D).transpose(0, 1)  # (B, Hkv, T, D)
    v = cache.v[0][:, table].reshape(HKV, B, nb * BS, D).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5, enable_gqa=True)


@pytest.mark.parametrize("chunk_bytes", [None, 2 * HKV * 3 * BS * D * 4])  # whole, or one row a gather
def test_gather_attention_over_reused_buffers_equals_a_reference(monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr(kv_cache, "GATHER_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(1)
    cache = PagedKVCache(1, BLOCKS, BS, HKV, D, torch.float32, "cpu")
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    # a large call, then a smaller one (a prefix of the buffer), then a large one again; in and out of inference
    for B, Q, nb, inference in ((5, 1, 3, True), (2, 3, 2, True), (6, 1, 3, False), (4, 2, 3, True)):
        table = torch.randint(1, BLOCKS, (B, nb), generator=g)
        q = torch.randn(B, HQ, Q, D, generator=g)
        mask = torch.rand(B, 1, Q, nb * BS, generator=g) < 0.7
        mask[..., 0] = True
        with torch.inference_mode(inference):
            got = cache.attend(0, q, table, mask, D ** -0.5)
        torch.testing.assert_close(got, _reference(cache, q, table, mask), rtol=1e-5, atol=1e-5)

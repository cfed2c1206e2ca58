"""flex_paged_attention against gathering the rows' blocks and SDPA, on a pool
whose blocks are scattered: decode rows of different lengths, a tree mask over the last region, a
prefill whose first block is shared by two rows, and a prefill longer than one flex call.

One pool for every case: one compiled graph serves them all (B, Q and table widths are dynamic).
System tier: torch.compile runs the C++ compiler, a subprocess, which the unit tier refuses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgrpo.rollout.runtime.flex_attention import MAX_ROWS, flex_paged_attention

pytestmark = pytest.mark.system

NUM_BLOCKS, BS, HQ, HKV, D = 96, 16, 4, 2, 16  # block 0 is scratch: padding of the tables
SCALE = D ** -0.5


def gather_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    B, nb = table.shape
    k = k_pool[:, table].reshape(HKV, B, nb * BS, D).transpose(0, 1)  # (B, Hkv, T, D)
    v = v_pool[:, table].reshape(HKV, B, nb * BS, D).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=SCALE, enable_gqa=True)


@pytest.fixture(scope="module")
def pool():
    g = torch.Generator().manual_seed(0)
    k_pool = torch.randn(HKV, NUM_BLOCKS, BS, D, generator=g)
    v_pool = torch.randn(HKV, NUM_BLOCKS, BS, D, generator=g)
    free = (torch.randperm(NUM_BLOCKS - 1, generator=g) + 1).tolist()  # blocks in random pool order
    try:
        flex_paged_attention(torch.randn(1, HQ, 1, D), k_pool, v_pool, torch.tensor([[free[0]]]),
                             torch.ones(1, 1, BS, dtype=torch.bool), SCALE)
    except Exception as e:  # no C++ compiler, a CPU without AVX2, an unsupported platform...
        pytest.skip(f"FlexAttention does not compile on this machine: {type(e).__name__}: {str(e).splitlines()[0]}")
    return k_pool, v_pool, free, g


def tables(free: list[int], blocks_per_row: list[int], nb: int) -> torch.Tensor:
    """(B, nb) tables of fresh blocks, padded with the scratch block 0."""
    table = torch.zeros(len(blocks_per_row), nb, dtype=torch.long)
    for b, n in enumerate(blocks_per_row):
        table[b, :n] = torch.tensor([free.pop() for _ in range(n)])
    return table


def check(pool, table: torch.Tensor, mask: torch.Tensor) -> None:
    k_pool, v_pool, _, g = pool
    q = torch.randn(table.shape[0], HQ, mask.shape[1], D, generator=g)
    out = flex_paged_attention(q, k_pool, v_pool, table, mask, SCALE)
    torch.testing.assert_close(out, gather_attention(q, k_pool, v_pool, table, mask), atol=1e-5, rtol=0)


def test_decode_rows_of_different_lengths(pool):
    lengths = torch.tensor([5, 37, 64])  # inside a block, across blocks, on a block boundary
    table = tables(pool[2], [1, 3, 4], nb=5)
    mask = torch.arange(5 * BS)[None, None] < lengths[:, None, None]  # (B, 1, T)
    check(pool, table, mask)


def test_tree_mask_over_the_last_region(pool):
    parents = [-1, 0, 0, 1, 1, 2]  # node i sees itself and its ancestors
    tree = torch.eye(6, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            tree[i] |= tree[p]
    past = torch.tensor([11, 30])  # the region follows each row's past: (11 + 6) and (30 + 6) positions
    table = tables(pool[2], [2, 3], nb=4)
    mask = torch.zeros(2, 6, 4 * BS, dtype=torch.bool)
    for b, n in enumerate(past.tolist()):
        mask[b, :, :n] = True
        mask[b, :, n:n + 6] = tree
    check(pool, table, mask)


def test_prefill_with_a_shared_first_block(pool):
    Q = 40
    shared = pool[2].pop()  # a cached prompt block the first two rows start with
    table = tables(pool[2], [3, 3, 3], nb=4)
    table[:2] = torch.cat([torch.full((2, 1), shared), table[:2, :3]], dim=1)
    starts = torch.tensor([BS, BS, 0])  # rows 0 and 1 prefill after the shared block, row 2 from 0
    j = torch.arange(4 * BS)[None, None]  # (1, 1, T)
    mask = j <= starts[:, None, None] + torch.arange(Q)[None, :, None]  # (B, Q, T) causal
    check(pool, table, mask)


def test_prefill_longer_than_one_flex_call(pool):
    Q = MAX_ROWS // (HQ // HKV) + 20  # query heads sharing a KV head each take a row
    nb = -(-Q // BS)
    table = tables(pool[2], [nb], nb=nb)
    mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    mask = F.pad(mask, (0, nb * BS - Q))[None]  # (1, Q, T)
    check(pool, table, mask)


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
def test_engine_on_the_flex_backend_decodes_as_on_the_gather_backend(pool, spec):
    """The whole engine (prefill, shared prompt blocks, decode, tree verification, the draft's
    cache) on either backend: the same greedy tokens, logprobs within float tolerance."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.rollout.speculative.controller import SpecController
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.tree import TreeShape
    from fastgrpo.wire.records import Sampling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    head = DraftHead.for_target(model).eval()
    prompts = (tuple(range(1, 38)), tuple(range(40, 57)))
    outputs = {}
    for backend in ("gather", "flex"):
        config = EngineConfig(max_running=8, attention_backend=backend)
        if spec:
            controller = SpecController("static", static_tree=TreeShape(2, 3, 6))
            engine = Engine(ModelRunner(model, headroom=controller.max_nodes()), (0,), config, Drafter(head), controller)
        else:
            engine = Engine(ModelRunner(model), (0,), config)
        try:
            req = GenerationRequest("f", prompts, 3, Sampling(temperature=0.0, max_new_tokens=12, ignore_eos=True))
            outputs[backend] = sorted(engine.submit(req), key=lambda c: (c.prompt_index, c.sample_index))
        finally:
            engine.shutdown()
    for a, b in zip(outputs["gather"], outputs["flex"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4

"""Failure suite: bad input to a real rollout service over gRPC is refused, and changes nothing.

One table of bad-input cases drives `test_bad_input_is_refused_and_changes_nothing` for the three
methods that take input:

  Generate       empty / missing prompts, token ids outside the vocabulary, prompt + max_new_tokens
                 past the context, non-finite or out-of-range temperature / top_p / top_k /
                 max_new_tokens / stop ids / num_samples, text to a model without a tokenizer, text
                 too long for the context (refused before it is tokenized), more sequences than
                 --max-queued, and bytes that are not a GenerateRequest;
  UpdateWeights  a stream without its header first, a second header, bad manifests (empty, unknown
                 or duplicated or tied-alias names, wrong shape / dtype / byte length, negative dims,
                 unknown dtype / kind / target), version rules (stale base, new <= base, a jump past
                 2^31), sha256 mismatch, streams ending early or carrying too much, an oversized
                 chunk, tensors holding NaN / Inf, finite updates whose result overflows the served
                 dtype (float16 dense and LoRA deltas, a float32 LoRA scale), LoRA factors that do not
                 fit (mismatched, orphaned, rank 0, above min(out, in), 2^31 declared in a header sent
                 alone), draft targets, and bytes that are not a WeightChunk;
  TrainDraft     a service without draft learning, every_n_batches < 0, bytes that are not a request.

Every case asserts (a) the exact status code, (b) that the message names what was wrong (the field
or tensor), (c) that the served weights did not move (GetStatus policy_checksum, policy_version and
draft_version equal to before) and (d) that the service still answers GetStatus and a small greedy
Generate. Raw stubs (and raw-bytes calls) are used, so the client library validates nothing first.

Two bounded, derandomized hypothesis fuzzers follow: sampling parameters drawn from wide ranges
(NaN, Inf, huge, negative) must give either well-formed completions (ids in the vocabulary, at most
max_new_tokens, finite logprobs <= 0, stop ids only at the end) or INVALID_ARGUMENT, exactly when
the contract says the request is bad; random weight streams (manifests from the model's names and
made-up ones, random shapes, dtypes, byte lengths, bytes and digests) must be applied exactly as
sent (the checksum a mirror of the served weights predicts) or refused with INVALID_ARGUMENT /
DATA_LOSS / FAILED_PRECONDITION leaving checksums and versions as they were.
Every call carries a deadline, so a service that waits forever fails the case instead of hanging.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fastgrpo.client.weights import WeightMirror
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.tensors import encode_tensor

pytestmark = pytest.mark.service

VOCAB = 97  # tiny_dir's vocabulary
CONTEXT = 64  # --max-context of the tiny services
MAX_QUEUED = 8  # --max-queued of the "tiny" service
CALL_TIMEOUT = 20.0  # seconds: every call has a deadline, so a service that buffers forever fails, not hangs
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIB = 1024 * 1024
GENERATE = "/fastgrpo.v1.RolloutService/Generate"
UPDATE = "/fastgrpo.v1.RolloutService/UpdateWeights"
TRAIN = "/fastgrpo.v1.RolloutService/TrainDraft"

Q = "model.layers.0.self_attn.q_proj.weight"  # (64, 64)
K = "model.layers.0.self_attn.k_proj.weight"  # (32, 64)
NORM = "model.norm.weight"  # (64,)
EMBED = "model.embed_tokens.weight"  # (97, 64)
FC = "fc.weight"  # the draft head's (64, 128)

IA, DL, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION
POLICY, DRAFT = pb.MODEL_TARGET_POLICY, pb.MODEL_TARGET_DRAFT
FULL, DENSE, LORA = pb.UPDATE_KIND_FULL, pb.UPDATE_KIND_DENSE_DELTA, pb.UPDATE_KIND_LORA_DELTA


# ------------------------------------------------------------------------------------------ services
def _serve(model_dir, **flags):
    """A rollout service in this process, from `fastgrpo-rollout serve` flags (as conftest's start_service)."""
    from fastgrpo.rollout.service.app import build_app
    from fastgrpo.rollout.service.cli import serve_config

    argv = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        argv += [f"--{flag}"] if value is True else [f"--no-{flag}"] if value is False else [f"--{flag}", str(value)]
    return build_app(serve_config(argv))


@dataclass
class Served:
    app: Any
    channel: grpc.Channel
    stub: pb_grpc.RolloutServiceStub
    extra: dict = field(default_factory=dict)

    def status(self) -> pb.StatusReply:
        return self.stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)

    def params(self, target: int = POLICY) -> dict[str, torch.Tensor]:
        store = self.app.servicer.draft if target == DRAFT else self.app.servicer.policy
        return store.params

    def close(self) -> None:
        self.channel.close()
        self.app.stop(grace=0.5)


def _connect(app) -> Served:
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    return Served(app, channel, pb_grpc.RolloutServiceStub(channel))


def _draft_head(tiny_dir, path):
    """A random draft head for tiny_dir, saved at `path` (what --draft loads)."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.rollout.speculative.draft_head import DraftHead

    torch.manual_seed(0)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(tiny_dir))).save(path)
    return path


# name -> (model fixture, flags); "draft" also gets a random draft head
SERVICES: dict[str, tuple[str, dict]] = {
    "tiny": ("tiny_dir", dict(max_running=4, max_context=CONTEXT, max_queued=MAX_QUEUED)),
    "f16": ("tiny_dir", dict(max_running=2, max_context=CONTEXT, dtype="float16")),
    "text": ("fixture_dir", dict(max_running=2, max_context=256)),
    "tied": ("tiny_tied_dir", dict(max_running=2, max_context=CONTEXT)),
    "draft": ("tiny_dir", dict(max_running=2, max_context=CONTEXT, draft_every_n_batches=0)),
    "fuzz": ("tiny_dir", dict(max_running=4, max_context=CONTEXT)),
}


class Services:
    """The module's services by name, each started on first use and reused by every case that names
    it: bad input changes nothing, so cases cannot disturb one another. A case that fails may have
    changed its service (an update accepted): `discard` it, and the next case gets a fresh one."""

    def __init__(self, request, tmp_path_factory):
        self._request, self._tmp = request, tmp_path_factory
        self._running: dict[str, Served] = {}

    def __call__(self, name: str) -> Served:
        if name not in self._running:
            fixture, flags = SERVICES[name]
            model_dir = self._request.getfixturevalue(fixture)
            if name == "draft":
                flags = dict(flags, draft=str(_draft_head(model_dir, self._tmp.mktemp("draft") / "head")))
            self._running[name] = _connect(_serve(model_dir, **flags))
        return self._running[name]

    def discard(self, name: str) -> None:
        svc = self._running.pop(name, None)
        if svc is not None:
            svc.close()

    def close(self) -> None:
        for name in list(self._running):
            self.discard(name)


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    services = Services(request, tmp_path_factory)
    yield services
    services.close()


# ------------------------------------------------------------------------------------------ messages
def gen(prompts=((1, 2, 3),), n=1, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest of token-id prompts (a str prompt is sent as text); greedy, 4 tokens unless overridden."""
    s = dict(temperature=0.0, max_new_tokens=4)
    s.update(sampling)
    return pb.GenerateRequest(
        prompts=[pb.Prompt(text=p) if isinstance(p, str) else pb.Prompt(token_ids=pb.TokenIds(ids=list(p))) for p in prompts],
        num_samples=n, sampling=pb.SamplingParams(**s),
    )


def spec(name: str, t: torch.Tensor, **override) -> tuple[pb.TensorSpec, bytes]:
    """The manifest entry of `t` under `name` (fields overridable) and its bytes."""
    meta, raw = encode_tensor(name, t.contiguous())
    s = meta.to_pb()
    fields = dict(name=s.name, dtype=s.dtype, shape=list(s.shape), byte_length=s.byte_length, sha256=s.sha256)
    fields.update(override)
    return pb.TensorSpec(**fields), raw


def chunks(header: pb.WeightHeader | None, *data: bytes) -> list[pb.WeightChunk]:
    out = [pb.WeightChunk(header=header)] if header is not None else []
    return out + [pb.WeightChunk(data=d) for d in data]


class Ctx:
    """What a case's builder sees: the service and its status just before the bad call."""

    def __init__(self, svc: Served, status: pb.StatusReply):
        self.svc, self.status = svc, status

    def version(self, target: int = POLICY) -> int:
        return self.status.draft_version if target == DRAFT else self.status.policy_version

    def param(self, name: str, target: int = POLICY) -> torch.Tensor:
        return self.svc.params(target)[name].detach().clone()

    def header(self, specs, kind=FULL, target=POLICY, base=None, new=None, scale=1.0) -> pb.WeightHeader:
        base = self.version(target if target in (POLICY, DRAFT) else POLICY) if base is None else base
        return pb.WeightHeader(target=target, kind=kind, base_version=base, new_version=base + 1 if new is None else new,
                               tensors=specs, lora=pb.LoraSpec(scale=scale))

    def push(self, tensors: dict[str, torch.Tensor], kind=FULL, target=POLICY, scale=1.0, **header) -> list[pb.WeightChunk]:
        """A well-formed stream of `tensors` (header options overridable): the bad part is elsewhere."""
        pairs = [spec(n, t) for n, t in tensors.items()]
        return chunks(self.header([s for s, _ in pairs], kind, target, scale=scale, **header), b"".join(r for _, r in pairs))

    def same(self, name: str = Q, target: int = POLICY, **header) -> list[pb.WeightChunk]:
        """A full update of `name` with its served values; valid but for what `header` overrides."""
        return self.push({name: self.param(name, target)}, FULL, target, **header)

    def valued(self, name: str, value: float, kind=FULL, where=(0,), target=POLICY) -> list[pb.WeightChunk]:
        """A full (or dense delta) update of `name` holding `value` at `where` (served values / zeros elsewhere)."""
        t = self.param(name, target) if kind == FULL else torch.zeros_like(self.param(name, target))
        t[where] = value
        return self.push({name: t}, kind, target)


def lora_factors(a_shape, b_shape, a_fill=0.01, b_fill=0.01, dtype=torch.float32, base=Q) -> dict[str, torch.Tensor]:
    """Constant LoRA factors A (a_shape) and B (b_shape) of weight `base`."""
    return {f"{base}.lora_A": torch.full(a_shape, a_fill, dtype=dtype),
            f"{base}.lora_B": torch.full(b_shape, b_fill, dtype=dtype)}


def lora_header_only(ctx: Ctx, rank: int, base=Q, out_in=(64, 64)) -> list[pb.WeightChunk]:
    """Only the header of a LoRA update declaring rank `rank` (no data follows: the refusal must come
    from the header alone, before the server is asked to buffer any factor)."""
    out_dim, in_dim = out_in
    specs = [pb.TensorSpec(name=f"{base}.lora_A", dtype=pb.DTYPE_FLOAT32, shape=[rank, in_dim],
                           byte_length=rank * in_dim * 4, sha256="0" * 64),
             pb.TensorSpec(name=f"{base}.lora_B", dtype=pb.DTYPE_FLOAT32, shape=[out_dim, rank],
                           byte_length=out_dim * rank * 4, sha256="0" * 64)]
    return chunks(ctx.header(specs, LORA))


def wrong_spec(ctx: Ctx, name=Q, data: Callable[[bytes], bytes] = lambda raw: raw, **override) -> list[pb.WeightChunk]:
    """A full update of `name` whose manifest entry has `override`; its bytes are data(served bytes)."""
    s, raw = spec(name, ctx.param(name), **override)
    return chunks(ctx.header([s]), data(raw))


def f16_embedding_setup(svc: Served) -> None:
    """For the float16 overflow case: one embedding entry served as 30000 (finite), in the row of a
    token the liveness Generate never feeds the model, so the service keeps generating the same. A
    delta of 60000 onto it is finite in float16, and its result (90000) is not."""
    if "row" not in svc.extra:
        out = list(svc.stub.Generate(gen(ignore_eos=True), timeout=CALL_TIMEOUT))
        used = {1, 2, 3} | set(out[0].token_ids)
        svc.extra["row"] = next(v for v in range(4, VOCAB) if v not in used)
    row = svc.extra["row"]
    if float(svc.params()[EMBED][row, 0]) < 1000:
        st = svc.status()
        delta = torch.zeros_like(svc.params()[EMBED])
        delta[row, 0] = 30000.0
        svc.stub.UpdateWeights(iter(Ctx(svc, st).push({EMBED: delta}, DENSE)), timeout=CALL_TIMEOUT)


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    id: str
    method: str  # Generate | UpdateWeights | TrainDraft (a bytes payload is sent as is, unparsed)
    service: str
    build: Callable[[Ctx], Any]
    code: grpc.StatusCode
    words: tuple[str, ...]  # all must appear in the status message
    setup: Callable[[Served], None] | None = None
    timeout: float = CALL_TIMEOUT


def G(id, build, words, code=IA, service="tiny", **kw):
    return Case(f"Generate-{id}", "Generate", service, build, code, (words,) if isinstance(words, str) else words, **kw)


def U(id, build, words, code=IA, service="tiny", **kw):
    return Case(f"UpdateWeights-{id}", "UpdateWeights", service, build, code, (words,) if isinstance(words, str) else words, **kw)


def T(id, build, words, code=IA, service="tiny", **kw):
    return Case(f"TrainDraft-{id}", "TrainDraft", service, build, code, (words,) if isinstance(words, str) else words, **kw)


LONG_TEXT = "the quick brown fox jumps over the lazy dog " * (2 * MIB // 44 + 1)  # ~2 MiB of ordinary words
GARBAGE = b"\xff\xff\xff"  # a truncated varint tag: no message parses from it

CASES = [
    # ---- Generate
    G("empty-prompt", lambda c: gen(((),)), "prompts[0]"),
    G("prompt-neither-text-nor-ids", lambda c: pb.GenerateRequest(prompts=[pb.Prompt()], num_samples=1,
                                                                 sampling=pb.SamplingParams(max_new_tokens=4)), "prompts[0]"),
    G("no-prompts", lambda c: gen(()), "prompts"),
    G("token-id-equals-vocab", lambda c: gen(((1, VOCAB),)), "prompts[0].token_ids"),
    G("token-id-int32-max", lambda c: gen(((INT32_MAX,),)), "prompts[0].token_ids"),
    G("token-id-negative", lambda c: gen(((1, -1),)), "prompts[0].token_ids"),
    G("second-prompt-bad-id", lambda c: gen(((1, 2), (5, 200))), "prompts[1].token_ids"),
    G("prompt-plus-max-new-past-context", lambda c: gen(((1, 2) * 20,), max_new_tokens=40), "max_new_tokens"),
    G("prompt-alone-past-context", lambda c: gen(((1,) * (CONTEXT + 1),), max_new_tokens=1), "max_new_tokens"),
    G("max-new-tokens-int32-max", lambda c: gen(max_new_tokens=INT32_MAX), "max_new_tokens"),
    G("max-new-tokens-zero", lambda c: gen(max_new_tokens=0), "sampling.max_new_tokens"),
    G("max-new-tokens-negative", lambda c: gen(max_new_tokens=-4), "sampling.max_new_tokens"),
    G("temperature-negative", lambda c: gen(temperature=-0.5), "sampling.temperature"),
    G("temperature-nan", lambda c: gen(temperature=math.nan), "sampling.temperature"),
    G("temperature-inf", lambda c: gen(temperature=math.inf), "sampling.temperature"),
    G("temperature-minus-inf", lambda c: gen(temperature=-math.inf), "sampling.temperature"),
    G("top-p-negative", lambda c: gen(top_p=-0.1), "sampling.top_p"),
    G("top-p-above-one", lambda c: gen(top_p=1.5), "sampling.top_p"),
    G("top-p-nan", lambda c: gen(top_p=math.nan), "sampling.top_p"),
    G("top-p-inf", lambda c: gen(top_p=math.inf), "sampling.top_p"),
    G("top-k-minus-3", lambda c: gen(top_k=-3), "sampling.top_k"),
    G("top-k-int32-min", lambda c: gen(top_k=INT32_MIN), "sampling.top_k"),
    G("stop-id-equals-vocab", lambda c: gen(stop_token_ids=[VOCAB]), "sampling.stop_token_ids"),
    G("stop-id-negative", lambda c: gen(stop_token_ids=[3, -5]), "sampling.stop_token_ids"),
    G("num-samples-zero", lambda c: gen(n=0), "num_samples"),
    G("num-samples-negative", lambda c: gen(n=-3), "num_samples"),
    G("more-sequences-than-max-queued", lambda c: gen(((1, 2), (3, 4), (5, 6)), n=3), ("num_samples", "--max-queued")),
    G("text-without-tokenizer", lambda c: gen(("hello",)), "prompts.text"),
    G("text-too-long-for-context", lambda c: gen((LONG_TEXT,)), ("prompts.text", "nothing was tokenized"),
      service="text", timeout=60.0),
    G("text-plus-max-new-past-context", lambda c: gen(("hello",), max_new_tokens=300), "max_new_tokens", service="text"),
    G("malformed-bytes", lambda c: GARBAGE, GENERATE),
    G("malformed-truncated-field", lambda c: b"\x12\x05\x0a", GENERATE),  # prompts: 5 bytes declared, 1 sent
    # ---- UpdateWeights: stream structure
    U("no-header", lambda c: chunks(None, spec(Q, c.param(Q))[1]), "header"),
    U("empty-stream", lambda c: [], "header"),
    U("data-before-header", lambda c: [pb.WeightChunk(data=b"\0" * 16)] + c.same(), "header"),
    U("two-headers", lambda c: c.same()[:1] + c.same(), ("only data chunks", "header")),
    U("empty-manifest", lambda c: chunks(c.header([])), "header.tensors"),
    U("unknown-tensor-name", lambda c: c.push({"model.nope.weight": c.param(Q)}), "model.nope.weight"),
    U("duplicated-name", lambda c: chunks(c.header([spec(Q, c.param(Q))[0]] * 2), spec(Q, c.param(Q))[1] * 2),
      ("header.tensors", "twice")),
    U("wrong-shape", lambda c: wrong_spec(c, shape=[32, 128]), f"tensors[{Q!r}].shape"),
    U("wrong-dtype", lambda c: chunks(c.header([spec(Q, c.param(Q).half())[0]]), spec(Q, c.param(Q).half())[1]),
      f"tensors[{Q!r}].dtype"),
    U("byte-length-not-shape", lambda c: wrong_spec(c, byte_length=64 * 64 * 4 - 4, data=lambda r: r[:-4]),
      f"tensors[{Q!r}].byte_length"),
    U("negative-dim", lambda c: wrong_spec(c, shape=[-64, -64]), (f"tensors[{Q!r}].shape", "negative")),
    U("dtype-unspecified", lambda c: wrong_spec(c, dtype=pb.DTYPE_UNSPECIFIED), f"tensors[{Q!r}].dtype"),
    U("dtype-unknown-enum", lambda c: wrong_spec(c, dtype=42), f"tensors[{Q!r}].dtype"),
    U("kind-unspecified", lambda c: c.push({Q: c.param(Q)}, kind=pb.UPDATE_KIND_UNSPECIFIED), "header.kind"),
    U("kind-unknown", lambda c: c.push({Q: c.param(Q)}, kind=7), "header.kind"),
    U("target-unspecified", lambda c: c.push({Q: c.param(Q)}, target=pb.MODEL_TARGET_UNSPECIFIED), "header.target"),
    U("target-unknown", lambda c: c.push({Q: c.param(Q)}, target=9), "header.target"),
    U("draft-target-without-draft", lambda c: c.push({NORM: c.param(NORM)}, target=DRAFT, base=0), "header.target", code=FP),
    # ---- UpdateWeights: versions
    U("stale-base-version", lambda c: c.same(base=c.version() + 5), "header.base_version", code=FP),
    U("base-version-behind", lambda c: c.same(base=c.version() - 1), "header.base_version", code=FP),
    U("new-version-equals-base", lambda c: c.same(new=c.version()), "header.new_version"),
    U("new-version-below-base", lambda c: c.same(new=c.version() - 1), "header.new_version"),
    U("new-version-int64-max", lambda c: c.same(new=INT64_MAX), "header.new_version"),
    U("new-version-2^31+1-above-base", lambda c: c.same(new=c.version() + 2**31 + 1), "header.new_version"),
    # ---- UpdateWeights: bytes
    U("sha256-mismatch", lambda c: wrong_spec(c, sha256="0" * 64), (f"tensors[{Q!r}]", "sha256"), code=DL),
    U("sha256-empty", lambda c: wrong_spec(c, sha256=""), (f"tensors[{Q!r}]", "sha256"), code=DL),
    U("stream-ends-early", lambda c: wrong_spec(c, data=lambda r: r[: len(r) // 2]), ("stream ended", repr(Q)), code=DL),
    U("header-only", lambda c: c.same()[:1], ("stream ended", repr(Q)), code=DL),
    U("second-tensor-missing", lambda c: c.push({Q: c.param(Q), NORM: c.param(NORM)})[:1] + [
        pb.WeightChunk(data=spec(Q, c.param(Q))[1])], ("stream ended", repr(NORM)), code=DL),
    U("more-bytes-than-declared", lambda c: c.same() + [pb.WeightChunk(data=b"xx")], "more bytes"),
    U("chunk-over-4mib", lambda c: c.same()[:1] + [pb.WeightChunk(data=b"\0" * (4 * MIB + 1))], ("data: chunk", "4194304")),
    U("full-nan", lambda c: c.valued(Q, math.nan), (f"tensors[{Q!r}]", "NaN")),
    U("full-inf", lambda c: c.valued(Q, math.inf, where=(5, 7)), (f"tensors[{Q!r}]", "Inf")),
    U("full-minus-inf-second-tensor", lambda c: c.push({Q: c.param(Q), NORM: torch.full((64,), -math.inf)}),
      f"tensors[{NORM!r}]"),
    U("dense-delta-nan", lambda c: c.valued(NORM, math.nan, kind=DENSE), f"tensors[{NORM!r}]"),
    U("dense-delta-overflows-float16", lambda c: c.valued(EMBED, 60000.0, kind=DENSE, where=(c.svc.extra["row"], 0)),
      (f"tensors[{EMBED!r}]", "float16"), service="f16", setup=f16_embedding_setup),
    # ---- UpdateWeights: LoRA
    U("lora-scale-nan", lambda c: c.push(lora_factors((2, 64), (64, 2)), LORA, scale=math.nan), "header.lora.scale"),
    U("lora-scale-inf", lambda c: c.push(lora_factors((2, 64), (64, 2)), LORA, scale=math.inf), "header.lora.scale"),
    U("lora-scale-overflows-float32", lambda c: c.push(lora_factors((2, 64), (64, 2), 1.0, 1.0), LORA, scale=3e38),
      (f"tensors[{Q!r}]", "float32")),
    U("lora-product-overflows-float16", lambda c: c.push(lora_factors((2, 64), (64, 2), 300.0, 300.0, torch.float16), LORA),
      (f"tensors[{Q!r}]", "float16"), service="f16"),
    U("lora-rank-2^31-header-alone", lambda c: lora_header_only(c, 2**31), (f"{Q}.lora_A", "rank")),
    U("lora-rank-above-min-header-alone", lambda c: lora_header_only(c, 33, base=K, out_in=(32, 64)), (f"{K}.lora_A", "rank")),
    U("lora-rank-zero", lambda c: lora_header_only(c, 0), (f"{Q}.lora_A", "rank")),
    U("lora-factors-mismatched", lambda c: c.push(lora_factors((2, 64), (64, 3)), LORA), f"{Q}.lora_A"),
    U("lora-factors-transposed", lambda c: c.push(lora_factors((64, 2), (2, 32), base=K), LORA), f"{K}.lora_A"),
    U("lora-orphan-a", lambda c: c.push({f"{Q}.lora_A": torch.zeros(2, 64)}, LORA), (f"{Q}.lora_A", "lora_B")),
    U("lora-orphan-b", lambda c: c.push({f"{Q}.lora_B": torch.zeros(64, 2)}, LORA), f"{Q}.lora_B"),
    U("lora-plain-tensor-name", lambda c: c.push({Q: c.param(Q)}, LORA), repr(Q)),
    U("lora-unknown-weight", lambda c: c.push(lora_factors((2, 64), (64, 2), base="model.nope.weight"), LORA),
      "model.nope.weight"),
    U("lora-of-a-vector", lambda c: c.push(lora_factors((1, 1), (64, 1), base=NORM), LORA), f"{NORM}.lora_A"),
    U("lora-factor-nan", lambda c: c.push({**lora_factors((2, 64), (64, 2)), f"{Q}.lora_A": torch.full((2, 64), math.nan)},
                                           LORA), f"{Q}.lora_A"),
    U("tied-alias-name", lambda c: c.push({EMBED: torch.ones_like(c.param("lm_head.weight"))}, DENSE), ("tied", EMBED),
      service="tied"),
    # ---- UpdateWeights: the draft target
    U("draft-stale-base-version", lambda c: c.same(FC, DRAFT, base=c.version(DRAFT) + 3), "header.base_version",
      code=FP, service="draft"),
    U("draft-full-nan", lambda c: c.valued(FC, math.nan, target=DRAFT), f"tensors[{FC!r}]", service="draft"),
    U("draft-policy-tensor-name", lambda c: c.push({NORM: c.param(NORM)}, target=DRAFT), NORM, service="draft"),
    U("malformed-bytes", lambda c: GARBAGE, UPDATE),
    # ---- TrainDraft
    T("run-now-without-draft-learning", lambda c: pb.TrainDraftRequest(run_now=True), "draft learning", code=FP),
    T("set-policy-without-draft-learning", lambda c: pb.TrainDraftRequest(set_policy=True, every_n_batches=2),
      "draft learning", code=FP),
    T("every-n-batches-negative", lambda c: pb.TrainDraftRequest(set_policy=True, every_n_batches=-1), "every_n_batches",
      service="draft"),
    T("every-n-batches-int32-min", lambda c: pb.TrainDraftRequest(set_policy=True, every_n_batches=INT32_MIN, run_now=True),
      "every_n_batches", service="draft"),
    T("malformed-bytes", lambda c: GARBAGE, TRAIN),
]


def _raw(channel: grpc.Channel, method: str, payload: bytes, timeout: float):
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    if method == "Generate":
        return list(channel.unary_stream(GENERATE, **ident)(payload, timeout=timeout))
    if method == "UpdateWeights":
        return channel.stream_unary(UPDATE, **ident)(iter([payload]), timeout=timeout)
    return channel.unary_unary(TRAIN, **ident)(payload, timeout=timeout)


def invoke(svc: Served, method: str, payload, timeout: float = CALL_TIMEOUT):
    if isinstance(payload, bytes):
        return _raw(svc.channel, method, payload, timeout)
    if method == "Generate":
        return list(svc.stub.Generate(payload, timeout=timeout))
    if method == "UpdateWeights":
        return svc.stub.UpdateWeights(iter(payload), timeout=timeout)
    return svc.stub.TrainDraft(payload, timeout=timeout)


def served_state(st: pb.StatusReply) -> tuple:
    return st.policy_checksum, st.policy_version, st.draft_version


def assert_alive(svc: Served) -> None:
    """GetStatus answers and a small valid Generate (token ids, greedy, 4 tokens) completes."""
    svc.status()
    out = list(svc.stub.Generate(gen(ignore_eos=True), timeout=CALL_TIMEOUT))
    assert len(out) == 1 and len(out[0].token_ids) == 4 and out[0].finish_reason == pb.FINISH_REASON_LENGTH


def draft_checksum(svc: Served) -> str | None:
    store = svc.app.servicer.draft
    return store.checksum if store is not None else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case: Case, served):
    svc = served(case.service)
    try:
        if case.setup is not None:
            case.setup(svc)
        before, before_draft = svc.status(), draft_checksum(svc)
        payload = case.build(Ctx(svc, before))
        with pytest.raises(grpc.RpcError) as err:
            invoke(svc, case.method, payload, case.timeout)
        code, details = err.value.code(), err.value.details() or ""
        assert code == case.code, f"{code.name}: {details}"
        for words in case.words:
            assert words in details, details
        after = svc.status()
        assert served_state(after) == served_state(before)
        assert draft_checksum(svc) == before_draft  # (no RPC reports the draft's checksum: read the store)
        assert_alive(svc)
    except BaseException:
        served.discard(case.service)  # it may serve what it should have refused: later cases get a fresh one
        raise


def test_the_table_covers_every_method():
    by_method = {m: sum(c.method == m for c in CASES) for m in ("Generate", "UpdateWeights", "TrainDraft")}
    assert sum(by_method.values()) >= 40 and all(by_method.values()), by_method
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------ fuzz: sampling
def f32(**kw):
    return st.floats(width=32, allow_nan=True, allow_infinity=True, **kw)


@st.composite
def sampling_requests(draw) -> pb.GenerateRequest:
    """Each parameter from its valid range, but for up to two drawn from anywhere their proto type allows."""
    wild = draw(st.sets(st.sampled_from(["temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids"]), max_size=2))

    def pick(name, valid, anywhere):
        return draw(anywhere if name in wild else valid)

    temperature = pick("temperature", st.one_of(st.floats(0, 4, width=32), st.sampled_from([0.0, 1.0, 1e-30, 1e-45, 3e38])),
                       st.one_of(f32(), st.sampled_from([-0.0, -1e-45, math.nan, math.inf, -math.inf])))
    top_p = pick("top_p", st.one_of(st.floats(0, 1, width=32), st.sampled_from([-0.0, 1e-7, 1.0])),
                 st.one_of(f32(), st.sampled_from([1.0000001, -1e-45, math.nan])))
    top_k = pick("top_k", st.integers(-1, VOCAB + 3), st.integers(INT32_MIN, INT32_MAX))
    max_new = pick("max_new_tokens", st.one_of(st.integers(1, 10), st.integers(CONTEXT - 16, CONTEXT - 6)),
                   st.one_of(st.integers(INT32_MIN, INT32_MAX), st.integers(-2, 0), st.integers(CONTEXT - 6, CONTEXT + 2)))
    stop = pick("stop_token_ids", st.lists(st.integers(0, VOCAB - 1), max_size=4),
                st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=4))
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6))
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new,
                                 stop_token_ids=stop, seed=draw(st.integers(0, 2**64 - 1)), has_seed=draw(st.booleans()),
                                 ignore_eos=draw(st.booleans()))
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=prompt))],
                              num_samples=draw(st.integers(1, 2)), sampling=sampling)


def contract_valid(req: pb.GenerateRequest) -> bool:
    """Whether rollout.proto says the request is valid (values as they arrive: float32, proto3 defaults)."""
    s = req.sampling
    top_p = s.top_p or 1.0  # proto3: 0 is unset
    top_k = s.top_k or -1
    return (math.isfinite(s.temperature) and s.temperature >= 0
            and math.isfinite(top_p) and 0 < top_p <= 1
            and (top_k == -1 or top_k >= 1)
            and s.max_new_tokens >= 1
            and all(0 <= t < VOCAB for t in s.stop_token_ids)
            and all(len(p.token_ids.ids) + s.max_new_tokens <= CONTEXT for p in req.prompts))


def tiny_temperature(t: float):
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=[1, 2, 3]))], num_samples=2,
                              sampling=pb.SamplingParams(temperature=t, max_new_tokens=8, seed=7, has_seed=True, ignore_eos=True))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=sampling_requests())
@example(req=tiny_temperature(1e-30))  # a temperature this small must not give NaN logprobs
@example(req=tiny_temperature(1e-45))  # (the smallest float32)
@example(req=tiny_temperature(3e38))
def test_fuzz_sampling_parameters(served, req):
    svc = served("fuzz")
    valid = contract_valid(req)
    try:
        out = list(svc.stub.Generate(req, timeout=CALL_TIMEOUT))
    except grpc.RpcError as err:
        event(f"refused {err.code().name} {err.details().split(':')[0]}")
        assert err.code() == IA, f"{err.code().name}: {err.details()}"
        assert not valid, f"a valid request was refused: {err.details()}"
    else:
        event("generated")
        assert valid, "an invalid request was accepted"
        s = req.sampling
        stops = set(s.stop_token_ids) | (set() if s.ignore_eos else {0})  # tiny_dir's EOS is 0
        assert sorted((c.prompt_index, c.sample_index) for c in out) == [(0, j) for j in range(req.num_samples)]
        for c in out:
            ids, lps = list(c.token_ids), list(c.logprobs)
            assert 1 <= len(ids) <= s.max_new_tokens and len(lps) == len(ids)
            assert all(0 <= t < VOCAB for t in ids), ids
            assert all(math.isfinite(lp) and lp <= 0 for lp in lps), lps
            assert not stops & set(ids[:-1]), (ids, stops)  # a stop id ends the completion
            if c.finish_reason == pb.FINISH_REASON_LENGTH:
                assert len(ids) == s.max_new_tokens
            else:
                assert c.finish_reason == pb.FINISH_REASON_STOP and ids[-1] in stops
    assert_alive(svc)


# ------------------------------------------------------------------------------------------ fuzz: weight streams
MADE_UP = ["model.nope.weight", "", "lm_head", "model.layers.9.mlp.up_proj.weight", "model.norm.weight.lora_A", "x" * 300]
DTYPES = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16,
          pb.DTYPE_FLOAT64: torch.float64}
OTHER_DTYPES = [pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64, pb.DTYPE_UNSPECIFIED, 17]
MAX_SENT = 64 * 1024  # bytes of one tensor a fuzzed stream sends at most
# what may be wrong with a push (none, one or two of them): each one alone makes it invalid, but for
# "random_bytes" (finite random floats are accepted) and "scale" (it matters to LoRA only)
FAULTS = ("target", "kind", "base", "new", "name", "duplicate", "shape", "dtype", "byte_length", "sha256", "short",
          "long", "non_finite", "random_bytes", "order", "scale", "empty", "data_first", "second_header", "random_manifest")


def _random_bytes(n: int, seed: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


@st.composite
def random_entry(draw, names: list[str]) -> dict:
    """A manifest entry drawn from wide ranges (any name, shape, dtype, byte length) with random bytes."""
    shape = draw(st.lists(st.integers(-2, 130), max_size=3))
    dtype = draw(st.sampled_from([*DTYPES, pb.DTYPE_UNSPECIFIED, 17]))
    consistent = math.prod(shape) * (DTYPES[dtype].itemsize if dtype in DTYPES else 4)
    byte_length = draw(st.one_of(st.just(consistent), st.integers(-5, 10**6), st.sampled_from([consistent + 2, 2**40])))
    raw = _random_bytes(max(0, min(byte_length, MAX_SENT)), draw(st.integers(0, 2**16)))
    return dict(name=draw(st.one_of(st.sampled_from(names), st.sampled_from(MADE_UP))), shape=shape, dtype=dtype,
                byte_length=byte_length, raw=raw, sha256=draw(st.sampled_from([hashlib.sha256(raw).hexdigest(), "0" * 64])))


@st.composite
def weight_pushes(draw, shapes: dict[int, dict[str, tuple[int, ...]]]) -> dict:
    """A weight push: valid, or with one or two FAULTS."""
    # (a seeded random.Random picks them: hypothesis' own choices favour the first of a list)
    faults = set(random.Random(draw(st.integers(0, 2**32))).sample(FAULTS, draw(st.sampled_from([0, 1, 1, 1, 2]))))
    target = draw(st.sampled_from([POLICY, POLICY, POLICY, DRAFT]))
    kind = draw(st.sampled_from([FULL, DENSE, LORA]))
    own = shapes[target]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == LORA:
        named = []
        for base in draw(st.lists(st.sampled_from(sorted(n for n, s in own.items() if len(s) == 2)), min_size=1, max_size=2,
                                  unique=True)):
            out_dim, in_dim = own[base]
            r = draw(st.sampled_from([1, 2, min(out_dim, in_dim)]))
            named += [(f"{base}.lora_A", (r, in_dim)), (f"{base}.lora_B", (out_dim, r))]
    else:
        named = [(n, own[n]) for n in draw(st.lists(st.sampled_from(sorted(own)), min_size=1, max_size=3, unique=True))]
    entries = [dict(name=n, shape=list(shape), dtype=pb.DTYPE_FLOAT32, values=torch.randn(shape, generator=g) * 0.02)
               for n, shape in named]
    pick = draw(st.integers(0, len(entries) - 1))  # the entry a fault hits
    e = entries[pick]
    if "name" in faults:
        e["name"] = draw(st.sampled_from(MADE_UP + sorted(shapes[DRAFT if target == POLICY else POLICY])))
    if "shape" in faults:
        e["shape"] = draw(st.lists(st.integers(-2, 130), max_size=3).filter(lambda sh: sh != e["shape"]))
        ok = all(d >= 0 for d in e["shape"]) and math.prod(e["shape"]) * 4 <= MAX_SENT
        e["values"] = torch.randn(e["shape"], generator=g) * 0.02 if ok else None
    if "dtype" in faults:
        e["dtype"] = draw(st.sampled_from(OTHER_DTYPES))
    if "non_finite" in faults and e["values"] is not None and e["values"].numel():
        where = draw(st.integers(0, e["values"].numel() - 1))
        e["values"].view(-1)[where] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    for x in entries:
        itemsize = DTYPES[x["dtype"]].itemsize if x["dtype"] in DTYPES else 4
        x["byte_length"] = math.prod(x["shape"]) * itemsize
        if x["values"] is not None and x["dtype"] in DTYPES and not ("random_bytes" in faults and x is e):
            x["raw"] = encode_tensor("", x["values"].to(DTYPES[x["dtype"]]))[1]
        else:  # random bytes of the declared length (finite random floats are a valid update)
            x["raw"] = _random_bytes(max(0, min(x["byte_length"], MAX_SENT)), draw(st.integers(0, 2**16)))
        x["sha256"] = hashlib.sha256(x["raw"]).hexdigest()
    if "byte_length" in faults:
        e["byte_length"] = draw(st.one_of(st.sampled_from([e["byte_length"] - 4, e["byte_length"] + 4, 0, -1, 2**40]),
                                          st.integers(-5, 10**6)).filter(lambda b: b != e["byte_length"]))
    if "sha256" in faults:
        e["sha256"] = draw(st.sampled_from(["0" * 64, "", e["sha256"][::-1], "not hex"]))
    if "duplicate" in faults:
        entries.append(dict(e))
    if "empty" in faults:
        entries = []
    if "random_manifest" in faults:
        entries = draw(st.lists(random_entry(sorted(own)), min_size=1, max_size=3))
    raws = [x["raw"] for x in entries]
    data = b"".join(reversed(raws) if "order" in faults else raws)
    if "short" in faults and data:
        data = data[: -draw(st.integers(1, min(8, len(data))))]
    if "long" in faults:
        data += b"\1" * draw(st.integers(1, 8))
    return dict(
        target=draw(st.sampled_from([pb.MODEL_TARGET_UNSPECIFIED, 3, 5])) if "target" in faults else target,
        kind=draw(st.sampled_from([pb.UPDATE_KIND_UNSPECIFIED, 4, 9])) if "kind" in faults else kind,
        base=(draw(st.one_of(st.tuples(st.just("rel"), st.sampled_from([-1, 1, 3])),
                             st.tuples(st.just("abs"), st.integers(INT64_MIN, INT64_MAX))))
              if "base" in faults else ("rel", 0)),
        new=(draw(st.one_of(st.tuples(st.just("rel"), st.sampled_from([0, -1, 2**31 + 1])),
                            st.tuples(st.just("abs"), st.integers(INT64_MIN, INT64_MAX))))
             if "new" in faults else ("rel", draw(st.sampled_from([1, 1, 1, 2, 2**31])))),
        scale=(draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38])) if "scale" in faults
               else draw(st.one_of(st.just(1.0), st.floats(-2, 2, width=32)))),
        entries=entries,
        pieces=_pieces(data, draw(st.integers(1, 3))),
        data_first="data_first" in faults,
        second_header="second_header" in faults,
        faults=sorted(faults),
    )


def _clamp64(v: int) -> int:
    return max(INT64_MIN, min(INT64_MAX, v))


def _pieces(data: bytes, n: int) -> list[bytes]:
    step = max(1, -(-len(data) // n))
    return [data[i:i + step] for i in range(0, len(data), step)]


@pytest.fixture
def weight_fuzz_service(tiny_dir, start_service, tmp_path):
    """tiny_dir with a draft head (no draft learning: only pushes move the draft), and mirrors of both."""
    app = start_service(tiny_dir, max_running=2, max_context=CONTEXT,
                        draft=str(_draft_head(tiny_dir, tmp_path / "head")), draft_learning=False)
    svc = _connect(app)
    mirrors = {POLICY: WeightMirror(app.servicer.policy.params), DRAFT: WeightMirror(app.servicer.draft.params)}
    yield svc, mirrors
    svc.channel.close()


@pytest.fixture(scope="module")
def fuzz_shapes(tiny_dir) -> dict[int, dict[str, tuple[int, ...]]]:
    """target -> name -> shape: tiny_dir's policy (tied aliases once) and its draft head."""
    from transformers import AutoModelForCausalLM

    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.wire.tensors import unique_state

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    head = DraftHead.for_target(model)
    return {target: {n: tuple(t.shape) for n, t in unique_state(m.state_dict()).items()}
            for target, m in ((POLICY, model), (DRAFT, head))}


def _decode(entry: dict) -> torch.Tensor:
    """The tensor an entry's bytes hold (as the server decodes them once it has accepted them)."""
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    if not entry["raw"]:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(entry["raw"]), dtype=dtype).reshape(shape).clone()


def _check_weight_push(svc: Served, mirrors: dict, push: dict) -> None:
    before = svc.status()
    target = push["target"]
    current = before.draft_version if target == DRAFT else before.policy_version
    base = _clamp64(current + push["base"][1]) if push["base"][0] == "rel" else push["base"][1]
    new = _clamp64(base + push["new"][1]) if push["new"][0] == "rel" else push["new"][1]
    specs = [pb.TensorSpec(name=e["name"], dtype=e["dtype"], shape=e["shape"], byte_length=e["byte_length"],
                           sha256=e["sha256"]) for e in push["entries"]]
    header = pb.WeightChunk(header=pb.WeightHeader(target=target, kind=push["kind"], base_version=base, new_version=new,
                                                   tensors=specs, lora=pb.LoraSpec(scale=push["scale"])))
    messages = [header] + [pb.WeightChunk(data=d) for d in push["pieces"]]
    if push["second_header"]:
        messages.insert(min(2, len(messages)), header)
    if push["data_first"]:
        messages.insert(0, pb.WeightChunk(data=b"\0"))
    try:
        reply = svc.stub.UpdateWeights(iter(messages), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        event(f"refused {err.code().name} {push['faults']}")
        assert err.code() in (IA, DL, FP), f"{err.code().name}: {err.details()}"
        assert served_state(svc.status()) == served_state(before), err.details()
    else:
        # applied: what was sent is served now, exactly as a mirror applying the same update computes
        event(f"applied {push['faults']}")
        mirror = mirrors[target]
        kind = {FULL: "full", DENSE: "dense_delta", LORA: "lora_delta"}[push["kind"]]
        sent = {e["name"]: _decode(e) for e in push["entries"]}
        new_values = mirror.preview(kind, sent, push["scale"])
        assert all(bool(torch.isfinite(v).all()) for v in new_values.values()), "an update to non-finite weights was applied"
        expected = mirror.expected_checksum(new_values)
        assert (reply.version, reply.checksum) == (new, expected)
        after = svc.status()
        assert (after.draft_version if target == DRAFT else after.policy_version) == new
        mirror.commit(new_values, new)
    assert (svc.status().policy_checksum, svc.app.servicer.draft.checksum) == (mirrors[POLICY].checksum, mirrors[DRAFT].checksum)
    assert len(list(svc.stub.Generate(gen(ignore_eos=True), timeout=CALL_TIMEOUT))) == 1  # still serving


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_weight_streams(weight_fuzz_service, fuzz_shapes, data):
    svc, mirrors = weight_fuzz_service
    _check_weight_push(svc, mirrors, data.draw(weight_pushes(fuzz_shapes), label="push"))

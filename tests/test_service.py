"""The gRPC service over 127.0.0.1: bad input is refused with the right code and changes nothing."""
from __future__ import annotations

import hashlib
import math
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load_file

from conftest import engine_held
from fastgrpo.client.weights import update_stream
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.tensors import tensor_bytes

pytestmark = pytest.mark.service


@pytest.fixture
def service(tiny_dir, start_service):
    app = start_service(tiny_dir, max_running=4, max_context=64)
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    yield app, pb_grpc.RolloutServiceStub(channel), channel
    channel.close()


def _generate(stub, prompts=((1, 2, 3),), n=1, **sampling):
    s = dict(temperature=0.0, max_new_tokens=8)
    s.update(sampling)
    req = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=list(p))) for p in prompts], num_samples=n,
        sampling=pb.SamplingParams(**s),
    )
    return list(stub.Generate(req, timeout=30))


@pytest.mark.parametrize(
    "prompts,n,sampling,field",
    [
        (((),), 1, {}, "prompts[0]"),
        (((1, 500),), 1, {}, "prompts[0].token_ids"),
        (((1, 2) * 20,), 1, {"max_new_tokens": 40}, "max_new_tokens"),
        (((1, 2),), 1, {"temperature": -0.5}, "sampling.temperature"),
        (((1, 2),), 1, {"temperature": math.nan}, "sampling.temperature"),
        (((1, 2),), 1, {"top_p": 1.5}, "sampling.top_p"),
        (((1, 2),), 1, {"top_p": -0.1}, "sampling.top_p"),
        (((1, 2),), 0, {}, "num_samples"),
        (((1, 2),), -3, {}, "num_samples"),
    ],
)
def test_generate_bad_input_is_invalid_argument(service, prompts, n, sampling, field):
    _, stub, _ = service
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, prompts, n, **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert len(_generate(stub)) == 1  # still answering


def test_status_health_and_reflection(service):
    app, stub, channel = service
    st = stub.GetStatus(pb.GetStatusRequest())
    assert st.model.vocab_size == 97 and st.model.max_context == 64 and st.policy_version == 0
    assert st.model.architecture == "Qwen2ForCausalLM" and len(st.policy_checksum) == 64
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "fastgrpo.v1.RolloutService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert "fastgrpo.v1.RolloutService" in names and "grpc.health.v1.Health" in names


def _state(tiny_dir):
    return load_file(str(tiny_dir / "model.safetensors"))


def _header_stream(header, data_chunks):
    yield pb.WeightChunk(header=header)
    for d in data_chunks:
        yield pb.WeightChunk(data=d)


def _spec(name, t, **override):
    raw = tensor_bytes(t)
    spec = dict(name=name, dtype=pb.DTYPE_FLOAT32, shape=list(t.shape), byte_length=len(raw),
                sha256=hashlib.sha256(raw).hexdigest())
    spec.update(override)
    return pb.TensorSpec(**spec), raw


def _bad_streams(tiny_dir):
    w = _state(tiny_dir)["model.layers.0.self_attn.q_proj.weight"]
    name = "model.layers.0.self_attn.q_proj.weight"
    ok_spec, raw = _spec(name, w)
    header = lambda specs, base=0, kind=pb.UPDATE_KIND_FULL: pb.WeightHeader(  # noqa: E731
        target=pb.MODEL_TARGET_POLICY, kind=kind, base_version=base, new_version=base + 1, tensors=specs)
    return {
        "unknown name": (_header_stream(header([_spec("model.nope.weight", w)[0]]), [raw]), grpc.StatusCode.INVALID_ARGUMENT, "model.nope.weight"),
        "wrong shape": (_header_stream(header([_spec(name, w.T.contiguous()[:8])[0]]), [raw]), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "wrong dtype": (_header_stream(header([_spec(name, w.half(), dtype=pb.DTYPE_FLOAT16)[0]]), [tensor_bytes(w.half())]), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        "wrong byte length": (_header_stream(header([_spec(name, w, byte_length=len(raw) - 4)[0]]), [raw[:-4]]), grpc.StatusCode.INVALID_ARGUMENT, "byte_length"),
        "wrong sha256": (_header_stream(header([_spec(name, w, sha256="0" * 64)[0]]), [raw]), grpc.StatusCode.DATA_LOSS, "sha256"),
        "ends early": (_header_stream(header([ok_spec]), [raw[: len(raw) // 2]]), grpc.StatusCode.DATA_LOSS, "ended"),
        "wrong base version": (_header_stream(header([ok_spec], base=5), [raw]), grpc.StatusCode.FAILED_PRECONDITION, "base_version"),
        "no header": (iter([pb.WeightChunk(data=raw)]), grpc.StatusCode.INVALID_ARGUMENT, "header"),
        "too many bytes": (_header_stream(header([ok_spec]), [raw, b"xx"]), grpc.StatusCode.INVALID_ARGUMENT, "more bytes"),
        "unknown kind": (_header_stream(header([ok_spec], kind=7), [raw]), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    }


def test_bad_weight_streams_change_nothing(service, tiny_dir):
    app, stub, _ = service
    before = stub.GetStatus(pb.GetStatusRequest())
    baseline = _generate(stub, max_new_tokens=48, ignore_eos=True)[0].token_ids
    # a long generation runs while the bad updates arrive; it must finish as if nothing happened
    result = {}
    t = threading.Thread(target=lambda: result.update(tokens=_generate(stub, max_new_tokens=48, ignore_eos=True)[0].token_ids))
    t.start()
    for case, (stream, code, words) in _bad_streams(tiny_dir).items():
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateWeights(stream, timeout=30)
        assert err.value.code() == code, (case, err.value.details())
        assert words in err.value.details(), (case, err.value.details())
        after = stub.GetStatus(pb.GetStatusRequest())
        assert (after.policy_checksum, after.policy_version) == (before.policy_checksum, before.policy_version), case
    t.join(60)
    assert result["tokens"] == baseline
    assert _generate(stub, max_new_tokens=48, ignore_eos=True)[0].token_ids == baseline


def test_draft_target_without_draft_is_failed_precondition(service, tiny_dir):
    _, stub, _ = service
    w = _state(tiny_dir)["model.norm.weight"]
    _, messages = update_stream({"model.norm.weight": w}, "full", 0, 1, target="draft")
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(messages, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_tied_alias_cannot_be_updated_twice(tiny_tied_dir, start_service):
    app = start_service(tiny_tied_dir)
    stub = pb_grpc.RolloutServiceStub(grpc.insecure_channel(f"127.0.0.1:{app.port}"))
    emb = app.servicer.policy.module.model.embed_tokens.weight
    # the embedding is tied to lm_head.weight (the first name in sorted order, which updates use):
    # accepting the other name too would let one delta be applied twice to the same storage
    _, messages = update_stream({"model.embed_tokens.weight": torch.ones_like(emb)}, "dense_delta", 0, 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(messages, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tied" in err.value.details()


def _threads_waiting_on_results() -> int:
    """Threads iterating a request handle (a Generate servicer thread waiting for completions)."""
    import sys
    import traceback

    return sum(any(f.name == "__iter__" and f.filename.endswith("scheduler/sequence.py") for f in traceback.extract_stack(fr))
               for fr in sys._current_frames().values())


def test_cancelled_generate_releases_its_server_thread(service):
    """A client that goes away (deadline, cancel) must not leave a servicer thread waiting forever:
    such threads would also keep the process from exiting. The engine is held between steps while
    the calls are made, so their deadline and cancel happen while their sequences wait."""
    import time

    app, stub, _ = service
    req = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=[1, 2, 3]))], num_samples=4,
                             sampling=pb.SamplingParams(temperature=1.0, max_new_tokens=60, ignore_eos=True))
    with engine_held(app.engine):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.Generate(req, timeout=30)
        deadline = time.monotonic() + 10
        while app.engine.snapshot()["queued"] < 8 and time.monotonic() < deadline:  # both requests are queued
            time.sleep(0.01)
        assert app.engine.snapshot()["queued"] == 8
        assert _threads_waiting_on_results() == 2  # both calls' servicer threads wait on their handles
        call.cancel()
    while _threads_waiting_on_results() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads_waiting_on_results() == 0
    while sum(app.engine.snapshot()[k] for k in ("running", "queued")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.engine.snapshot()["running"] == 0 and app.engine.snapshot()["queued"] == 0


def test_a_push_abandoned_before_its_commit_is_not_applied(service, tiny_dir):
    """The client's deadline passes after the last chunk but before the update is applied (the
    engine is held between steps meanwhile): the server must not apply what nobody waits for."""
    app, stub, _ = service
    before = (app.servicer.policy.version, app.servicer.policy.checksum)
    weights = load_file(str(tiny_dir / "model.safetensors"))
    _, messages = update_stream({"model.norm.weight": weights["model.norm.weight"] + 1}, "full", 0, 1)
    with engine_held(app.engine):
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateWeights(messages, timeout=1.0)  # every byte arrives; the commit waits for the engine
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server's deadline started when the call reached it, a little after the client's: let
        # it pass too before the commit may run (waiting longer only makes the case plainer)
        time.sleep(0.2)
    app.engine.run_exclusive(lambda: None)  # the refused commit has run on the engine thread
    assert (app.servicer.policy.version, app.servicer.policy.checksum) == before


def test_the_bearer_token_can_come_from_a_file_or_the_environment(tiny_dir, start_service, tmp_path, monkeypatch):
    """A token given on the command line shows in the process list; a file or $FASTGRPO_AUTH_TOKEN
    keeps it out. Either way, a call without it is UNAUTHENTICATED and health checks stay open."""
    from fastgrpo.client import NO_RETRY, RolloutClient, RolloutError

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-file\n")
    from_file = start_service(tiny_dir, auth_token_file=str(token_file))
    monkeypatch.setenv("FASTGRPO_AUTH_TOKEN", "s3cret-from-env")
    from_env = start_service(tiny_dir)
    for app, token in ((from_file, "s3cret-from-file"), (from_env, "s3cret-from-env")):
        address = f"127.0.0.1:{app.port}"
        with RolloutClient(address, token=token) as client:
            assert client.status().policy_version == 0
        with RolloutClient(address, token=token + "x", retry=NO_RETRY) as client:
            client.wait_ready(timeout=10)  # health checks stay open to probes
            with pytest.raises(RolloutError) as info:
                client.status()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        start_service(tiny_dir, auth_token_file=str(empty))

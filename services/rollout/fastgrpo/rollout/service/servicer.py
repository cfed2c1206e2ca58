"""RolloutService over gRPC: each method validates, converts (fastgrpo.wire.convert) and delegates
to the engine, the weight stores or the draft learner."""
from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Callable

import grpc

from fastgrpo.rollout.draft_learning.online import OnlineDraftLearner
from fastgrpo.rollout.scheduler.engine import Engine
from fastgrpo.rollout.scheduler.requests import GenerationRequest, InvalidRequest
from fastgrpo.rollout.service.limits import ServiceLimits, Slots, idle_bounded
from fastgrpo.rollout.service.metrics import RolloutMetrics
from fastgrpo.rollout.service.weights import WeightStore
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.convert import from_pb, to_pb
from fastgrpo.wire.errors import WireError
from fastgrpo.wire.records import KVCache, ModelInfo, Sampling, Speculation, Status

log = logging.getLogger("fastgrpo.rollout")
DRAIN_BYTES = 64 * 1024 * 1024  # what a refused push's stream may still send before it is cut


def request_from_pb(req: pb.GenerateRequest, request_id: str, tokenize: Callable[[str], list[int]]) -> GenerationRequest:
    """A GenerateRequest as the engine takes it: text prompts tokenized, sampling as a record."""
    prompts = []
    for i, p in enumerate(req.prompts):
        which = p.WhichOneof("input")
        if which == "token_ids":
            prompts.append(tuple(p.token_ids.ids))
        elif which == "text":
            prompts.append(tuple(tokenize(p.text)))
        else:
            raise InvalidRequest(f"prompts[{i}]", "prompt is empty (set token_ids or text)")
    return GenerationRequest(request_id=request_id, prompts=tuple(prompts), num_samples=req.num_samples,
                             sampling=from_pb(Sampling, req.sampling))


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of the vocabulary spells (a byte-level BPE token's symbols
    count up to 2 bytes each here: an upper bound is what is needed)."""
    return max((len(token.encode()) for token in tokenizer.get_vocab()), default=1)


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, engine: Engine, policy: WeightStore, tokenizer, model_info: ModelInfo,
                 draft: WeightStore | None = None, metrics: RolloutMetrics | None = None,
                 draft_learner: OnlineDraftLearner | None = None, limits: ServiceLimits = ServiceLimits()):
        """policy: the served model weights; draft: the draft head's, when one is served."""
        self.engine = engine
        self.metrics = metrics or RolloutMetrics()
        self.policy = policy
        self.draft = draft
        self.draft_learner = draft_learner
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.limits = limits
        self._long_calls = Slots(limits.long_calls)
        self._pushes = Slots(limits.max_pushes)
        # a text that needs more tokens than the context holds is refused before it is tokenized:
        # every token spells at most max_token_bytes (x4 for what normalization may fold)
        self._max_text_bytes = 4 * model_info.max_context * (max_token_bytes(tokenizer) if tokenizer else 1)

    def _refuse(self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str):
        """Ends the call with `code` and `message` (raises), and counts it."""
        self.metrics.refused.labels(method, code.name).inc()
        context.abort(code, message)

    def _busy(self, context: grpc.ServicerContext, method: str, slots: Slots, what: str):
        return lambda: self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{slots.limit} {what} in flight, the most this service takes at once; retry later")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        with self._long_calls.take(self._busy(context, "Generate", self._long_calls, "long calls")):
            request_id = request.request_id or uuid.uuid4().hex
            try:
                handle = self.engine.submit(request_from_pb(request, request_id, self._tokenize))
            except InvalidRequest as exc:
                self._refuse(context, "Generate", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except OverflowError as exc:
                self._refuse(context, "Generate", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self.metrics.requests.inc()
            # client gone or deadline hit: free its slots (at once when the call ended before this line)
            if not context.add_callback(handle.cancel):
                handle.cancel()
            for result in handle:
                text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True) if self.tokenizer else ""
                yield to_pb(dataclasses.replace(result, text=text))

    def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("prompts.text", "this model has no tokenizer; send token_ids")
        size = len(text.encode())
        if size > self._max_text_bytes:
            raise InvalidRequest("prompts.text", f"{size} bytes of text cannot fit the {self.model_info.max_context}-token "
                                                 "context; nothing was tokenized")
        return self.tokenizer(text)["input_ids"]

    def UpdateWeights(self, request_iterator, context: grpc.ServicerContext):
        limits = self.limits

        def idle():
            self._refuse(context, "UpdateWeights", grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"no chunk arrived for {limits.push_idle_timeout_s:g} s (--push-idle-timeout-s); "
                         "nothing was applied")

        with self._long_calls.take(self._busy(context, "UpdateWeights", self._long_calls, "long calls")), \
                self._pushes.take(self._busy(context, "UpdateWeights", self._pushes, "weight updates")):
            messages = idle_bounded(request_iterator, limits.push_idle_timeout_s, context.is_active, idle)
            try:
                first = next(messages, None)
                if first is None or first.WhichOneof("payload") != "header":
                    raise WireError("the first message of the stream must carry the header")
                header = first.header
                store = self._store(header.target)
                pending = store.begin(header)
                for msg in messages:
                    if msg.WhichOneof("payload") != "data":
                        raise WireError("only data chunks may follow the header")
                    pending.receive(msg.data)
                pending.finish()
                result = self.engine.run_exclusive(lambda: self._commit(store, pending, context))
            except WireError as exc:
                log.warning("weight update refused: %s", exc)
                self._drain(messages)
                self._refuse(context, "UpdateWeights", getattr(grpc.StatusCode, exc.code), str(exc))
            except ConnectionAbortedError:  # the client cancelled, or vanished, mid-stream
                self._refuse(context, "UpdateWeights", grpc.StatusCode.CANCELLED,
                             "the call ended before the update arrived whole; nothing was applied")
        log.info("weights updated to version %d in %.3fs (%d bytes)", result.version, result.seconds, result.bytes_received)
        self.metrics.weights_updated("policy" if store is self.policy else "draft", result.seconds, result.bytes_received)
        reply = to_pb(result)
        reply.target = header.target
        return reply

    @staticmethod
    def _drain(messages) -> None:
        """Reads and drops the rest of a refused stream (up to DRAIN_BYTES) before the refusal: a
        status sent while the client still writes reaches grpc.aio clients as INTERNAL
        (grpc/grpc#36066); a longer stream is cut, at that risk."""
        drained = 0
        try:
            for msg in messages:
                drained += msg.ByteSize()
                if drained > DRAIN_BYTES:
                    return
        except ConnectionAbortedError:
            return

    def _commit(self, store: WeightStore, pending, context: grpc.ServicerContext):
        # runs on the engine thread, so sequences admitted from the next step on carry the new version
        # nobody waits for this update any more: the trainer saw it fail (the deadline is read off the
        # clock, since the server learns of an expired call only when its poller gets to it)
        if not context.is_active() or context.time_remaining() <= 0:
            raise WireError("the call ended (cancelled, or past its deadline) before the update was applied; "
                            "nothing was applied", "CANCELLED")
        result = store.commit(pending)
        if store is self.policy:
            self.engine.set_policy_version(result.version)
        elif self.draft_learner is not None:  # a draft pushed from outside replaces the shadow too
            self.draft_learner.sync_from_live()
        return result

    def _store(self, target: int) -> WeightStore:
        if target == pb.MODEL_TARGET_POLICY:
            return self.policy
        if target == pb.MODEL_TARGET_DRAFT:
            if self.draft is None:
                raise WireError("header.target: this server hosts no draft model (start it with --draft)",
                                "FAILED_PRECONDITION")
            return self.draft
        raise WireError(f"header.target: unknown target {target}")

    def TrainDraft(self, request: pb.TrainDraftRequest, context: grpc.ServicerContext):
        learner = self.draft_learner
        if learner is None:
            self._refuse(context, "TrainDraft", grpc.StatusCode.FAILED_PRECONDITION,
                         "draft learning is not enabled (start the server with --draft and --draft-learning)")
        if request.set_policy:  # (the proto's name for the schedule)
            if request.every_n_batches < 0:
                self._refuse(context, "TrainDraft", grpc.StatusCode.INVALID_ARGUMENT,
                             f"every_n_batches: must be >= 0, got {request.every_n_batches}")
            learner.set_schedule(request.every_n_batches)
        if request.run_now:
            with self._long_calls.take(self._busy(context, "TrainDraft", self._long_calls, "long calls")):
                fut = learner.schedule(force=True)
                self.engine.wake()
                try:
                    fut.result(timeout=context.time_remaining())
                except TimeoutError:
                    self._refuse(context, "TrainDraft", grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "the draft round did not finish before the deadline (it completes in the background)")
        return to_pb(learner.stats())

    def GetStatus(self, request, context):
        return to_pb(self.status())

    def status(self) -> Status:
        """What GetStatus answers; the metrics layer reads it at every scrape."""
        snap = self.engine.snapshot()
        return Status(
            policy_version=self.policy.version,
            policy_checksum=self.policy.checksum,
            running_sequences=snap["running"],
            queued_sequences=snap["queued"],
            max_running_sequences=self.engine.config.max_running,
            draft_version=self.draft.version if self.draft is not None else 0,
            model=self.model_info,
            speculation=self._speculation(),
            kv_cache=self._kv_cache(snap),
        )

    def _kv_cache(self, snap: dict) -> KVCache:
        blocks = snap["kv_blocks"]
        return KVCache(
            block_size=self.engine.blocks.block_size, blocks_total=blocks.total,
            bytes_total=blocks.total * self.engine.kv_bytes_per_block, blocks_used=blocks.used,
            blocks_cached=blocks.cached, blocks_free=blocks.free, preemptions=snap["preemptions"],
            shared_prompt_tokens=snap["shared_prompt_tokens"],
        )

    def _speculation(self) -> Speculation:
        controller = self.engine.controller
        if controller is None:
            return Speculation()
        tree = self.engine.last_tree
        cal = controller.calibrator
        text = self.engine.text_drafts
        history = text.history if text else None
        accepted = dict(self.engine.accepted_by_source)
        c_peak, source = cal.snapshot()
        return Speculation(
            mode=controller.mode, c_peak=c_peak, c_peak_source=source,
            batch_size=self.engine.last_batch_size, n_verify=tree.n_verify if tree else 0,
            width=tree.width if tree else 0, depth=tree.depth if tree else 0,
            c_peak_start=cal.initial[0], c_peak_start_source=cal.initial[1], c_peak_updates=cal.updates,
            alpha=controller.alpha, alpha_start=controller.controller.alpha, alpha_updates=cal.alpha_updates,
            sources=",".join(("head",) * (self.engine.spec.drafter is not None) + (text.sources if text else ())),
            accepted_head=accepted["head"], accepted_siblings=accepted["siblings"], accepted_history=accepted["history"],
            history_tokens=history.tokens if history else 0, history_prompts=len(history) if history else 0,
            **{f"steps_{way}": n for way, n in self.engine.chooser.steps.items()},
            way_rates=tuple(self.engine.chooser.table()),
        )

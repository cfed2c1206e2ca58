"""Proto <-> engine dataclasses. No logic beyond field mapping and proto3 default handling."""
from __future__ import annotations

from typing import Callable

from fastgrpo.rollout.engine.types import (
    CompletionResult,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    SamplingConfig,
)
from fastgrpo.v1 import rollout_pb2 as pb

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def sampling_from_pb(s: pb.SamplingParams) -> SamplingConfig:
    return SamplingConfig(
        temperature=s.temperature,
        top_p=s.top_p if s.top_p != 0 else 1.0,  # proto3 unset -> no truncation
        top_k=s.top_k if s.top_k != 0 else -1,
        max_new_tokens=s.max_new_tokens,
        stop_token_ids=tuple(s.stop_token_ids),
        seed=s.seed if s.has_seed else None,
        ignore_eos=s.ignore_eos,
    )


def request_from_pb(
    req: pb.GenerateRequest, request_id: str, tokenize: Callable[[str], list[int]]
) -> GenerationRequest:
    prompts = []
    for i, p in enumerate(req.prompts):
        which = p.WhichOneof("input")
        if which == "token_ids":
            prompts.append(tuple(p.token_ids.ids))
        elif which == "text":
            prompts.append(tuple(tokenize(p.text)))
        else:
            raise InvalidRequest(f"prompts[{i}]", "prompt is empty (set token_ids or text)")
    return GenerationRequest(
        request_id=request_id,
        prompts=tuple(prompts),
        num_samples=req.num_samples,
        sampling=sampling_from_pb(req.sampling),
    )


def completion_to_pb(c: CompletionResult, text: str) -> pb.Completion:
    return pb.Completion(
        request_id=c.request_id,
        prompt_index=c.prompt_index,
        sample_index=c.sample_index,
        token_ids=c.token_ids,
        logprobs=c.logprobs,
        finish_reason=_FINISH[c.finish_reason],
        policy_version=c.policy_version,
        spec=pb.SpecStats(
            drafted_tokens=c.spec.drafted, accepted_tokens=c.spec.accepted, verify_steps=c.spec.verify_steps,
            accepted_per_depth=list(c.spec.accepted_per_depth),
        ),
        text=text,
    )

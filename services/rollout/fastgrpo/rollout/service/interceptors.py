"""Server interceptors: bearer-token authentication, and requests that are not their method's message."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from fastgrpo.rollout.service.config import ServeConfig


class BearerAuth(grpc.ServerInterceptor):
    """Rejects calls without 'authorization: Bearer <token>'. Health checks stay open for probes.
    The comparison takes the same time wherever the tokens differ."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if not hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected):
            return self._deny
        return continuation(handler_call_details)


def auth_token(cfg: ServeConfig) -> str:
    """The bearer token: --auth-token, else --auth-token-file's content, else $FASTGRPO_AUTH_TOKEN ("": none)."""
    if cfg.auth_token:
        return cfg.auth_token
    if cfg.auth_token_file:
        token = Path(cfg.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"--auth-token-file {cfg.auth_token_file} is empty")
        return token
    return os.environ.get("FASTGRPO_AUTH_TOKEN", "")


# (request_streaming, response_streaming) -> (handler factory, the handler's behaviour attribute)
HANDLER_KINDS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def behaviour_of(handler: grpc.RpcMethodHandler):
    """The function a method handler runs, whatever its kind."""
    return getattr(handler, HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)][1])


def handler_like(handler: grpc.RpcMethodHandler, behaviour, request_deserializer) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind running `behaviour` (an interceptor's replacement for it)."""
    make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)][0]
    return make(behaviour, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)


class MalformedRequests(grpc.ServerInterceptor):
    """A request whose bytes are not a valid message of its method is refused with INVALID_ARGUMENT,
    naming the method (gRPC itself answers INTERNAL: "Exception deserializing request!")."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parse = handler_call_details.method, handler.request_deserializer

        def parsed(raw: bytes, context):
            try:
                return parse(raw)
            except Exception as exc:  # protobuf's DecodeError, or whatever a parser raises on garbage
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{method}: the request is not a valid message of this method ({exc})")

        behaviour = behaviour_of(handler)
        if handler.request_streaming:
            def call(raws, context):
                return behaviour((parsed(raw, context) for raw in raws), context)
        else:
            def call(raw, context):
                return behaviour(parsed(raw, context), context)
        return handler_like(handler, call, request_deserializer=None)

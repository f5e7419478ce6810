"""The authentication interceptor: token check and per-token rate limit before any handler runs.

Health and reflection stay open (probes and tooling carry no token). The caller's Principal is set
in ``current_principal`` for the handler, which checks the model scope once it has decoded which
model the request asks for. grpc.aio runs interceptors and the handler in the RPC's one task, so
the context variable reaches the handler.
"""

from __future__ import annotations

import logging

import grpc

from mlipserve.errors import RateLimitedError, UnauthenticatedError
from mlipserve.server.auth import Authenticator, current_principal
from mlipserve.server.observer import NO_OBSERVER, Call, RequestObserver, auth_failure_reason
from mlipserve.status import abort, status_for

logger = logging.getLogger("mlipserve.server")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refusal(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``error``'s status."""

    async def refuse(request, context):
        await abort(context, error)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, observer: RequestObserver = NO_OBSERVER) -> None:
        self.authenticator = authenticator
        self.observer = observer

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            principal = self.authenticator.authenticate(handler_call_details.invocation_metadata)
        except (UnauthenticatedError, RateLimitedError) as error:
            # The method and the reason, never the metadata: it holds the token.
            logger.info("refused %s: %s", handler_call_details.method, type(error).__name__)
            # Counted here, before the request is read: its model is not known.
            self.observer.auth_failed(auth_failure_reason(error))
            Call(self.observer, frozenset(), handler_call_details.method.rsplit("/", 1)[-1]).finish(
                status_for(error).code.name)
            return _refusal(handler, error)
        current_principal.set(principal)
        return handler

"""Which failed calls are worth retrying, after how long, and how a failure reaches the caller.

Every RPC of the API is a pure function of its request, so retrying is always safe: the question
is only whether it can help. The unary calls, MD sessions and workflow streams all follow this.
"""

from __future__ import annotations

import grpc

from mlipserve_client.errors import ServiceError, ServiceInputError

# Trailing metadata of a status worth retrying after a delay (queue full, rate limit, lost replica).
RETRY_AFTER_KEY = "retry-after-ms"
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
_INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def raise_service_error(err: grpc.RpcError, code: grpc.StatusCode | None = None, details: str | None = None) -> None:
    """Raise ``err`` as the client's exception (ServiceInputError for bad input, else ServiceError)."""
    code, details = code or err.code(), details or err.details() or ""
    error_class = ServiceInputError if code in _INPUT_CODES else ServiceError
    raise error_class(code, details) from None


def retry_delay(err: grpc.RpcError, backoff: float) -> float | None:
    """Seconds to wait before retrying ``err``, or None if retrying cannot help.

    UNAVAILABLE (server restarting, replica lost, connection refused, draining) is retried with
    backoff; RESOURCE_EXHAUSTED only when the server says when (queue full, rate limit): without
    ``retry-after-ms`` it is a request over a size limit, which would fail again."""
    code = err.code()
    hint = next((float(v) / 1000 for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER_KEY), None)
    if code is grpc.StatusCode.UNAVAILABLE:
        return max(backoff, hint or 0.0)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None:
        return max(backoff, hint)
    return None

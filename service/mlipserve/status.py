"""The one place where exceptions become gRPC status codes.

Clients never see a Ray traceback: known errors map to their status with their own message; a
replica lost under a request is UNAVAILABLE (the client retries); anything else answers INTERNAL
with a short message and an error id that the server logs with the traceback. Statuses the client
should retry after a while carry the delay in the ``retry-after-ms`` trailing metadata; a
RESOURCE_EXHAUSTED without it (a request over a size limit) is not worth retrying as it is.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from mlipserve.errors import (
    InvalidSystemError,
    LimitExceededError,
    ModelNotFoundError,
    ModelUnavailableError,
    PermissionDeniedError,
    RateLimitedError,
    ReplicaLostError,
    ServerBusyError,
    ServerDrainingError,
    SystemTooLargeError,
    UnauthenticatedError,
)
from mlipserve_client.retries import RETRY_AFTER_KEY

logger = logging.getLogger("mlipserve")

# Checked in order; the first class the error is an instance of decides.
_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidSystemError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ReplicaLostError, grpc.StatusCode.UNAVAILABLE),
    (ServerDrainingError, grpc.StatusCode.UNAVAILABLE),
    (RayActorError, grpc.StatusCode.UNAVAILABLE),
    (ReplicaUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeploymentUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServerBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SystemTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)
# Messages of our own for errors whose text is Ray's (actor ids, tracebacks).
_MESSAGES: dict[type[BaseException], str] = {
    BackPressureError: "the server is at capacity; retry shortly",
    DeploymentUnavailableError: "the model is not deployed or has no running replica; retry shortly",
    RayActorError: "the model's replica was lost; retry shortly",
    ReplicaUnavailableError: "the model's replica was lost; retry shortly",
    TimeoutError: "the request did not finish before its deadline",
}
_RETRY_AFTER_S = {BackPressureError: 0.5, DeploymentUnavailableError: 1.0, RayActorError: 1.0,
                  ReplicaUnavailableError: 1.0, ReplicaLostError: 1.0}


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None  # set where the client should retry after this delay
    trailers: tuple[tuple[str, str], ...] = ()  # further trailing metadata the error carries

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return self.trailers
        return ((RETRY_AFTER_KEY, str(max(1, round(self.retry_after_s * 1000)))), *self.trailers)


def _unwrap(error: BaseException) -> BaseException:
    # An exception raised in another replica arrives wrapped with its remote traceback.
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def status_for(error: BaseException) -> Status:
    """The status, client-facing message and retry hint for ``error``."""
    error = _unwrap(error)
    for error_type, code in _STATUS:
        if isinstance(error, error_type):
            own = str(error) if type(error).__module__ == "mlipserve.errors" else None
            message = own or next((m for t, m in _MESSAGES.items() if isinstance(error, t)), None) or str(error)
            retry = getattr(error, "retry_after_s", None)
            if retry is None:
                retry = next((r for t, r in _RETRY_AFTER_S.items() if isinstance(error, t)), None)
            return Status(code, message, retry, getattr(error, "trailers", ()))
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=error)
    return Status(grpc.StatusCode.INTERNAL, f"internal server error (id {error_id}); the server log has the details")


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the RPC with the status of ``error`` (raises, as ``context.abort`` does)."""
    status = status_for(error)
    await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata())

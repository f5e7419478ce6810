"""The one place where exceptions become gRPC status codes.

Clients never see a Ray traceback: known errors map to their status with their own message; anything
else answers INTERNAL with a short message and an error id that the server logs with the traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from mlipserve.errors import (
    InvalidSystemError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServerBusyError,
    SystemTooLargeError,
)

logger = logging.getLogger("mlipserve")

# Checked in order; the first class the error is an instance of decides.
_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidSystemError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeploymentUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServerBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SystemTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def _unwrap(error: BaseException) -> BaseException:
    # An exception raised in another replica arrives wrapped with its remote traceback.
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``error``."""
    error = _unwrap(error)
    for error_type, code in _STATUS:
        if isinstance(error, error_type):
            if isinstance(error, BackPressureError):
                return code, "the server is at capacity; retry shortly"
            if isinstance(error, DeploymentUnavailableError):
                return code, "the model is not deployed or has no running replica; retry shortly"
            if isinstance(error, TimeoutError):
                return code, "the request did not finish before its deadline"
            return code, str(error)
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal server error (id {error_id}); the server log has the details"


def grpc_method(response_type: type) -> Callable:
    """Decorate an ingress RPC method: any exception becomes a status on ``grpc_context``.

    The method must take ``grpc_context`` (Ray Serve passes it by that name). On error the client
    receives the mapped status; the empty ``response_type`` returned is not delivered.
    """

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        async def wrapper(self, request, grpc_context) -> Any:
            try:
                return await method(self, request, grpc_context)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - every error must reach the client as a status
                code, message = status_for(error)
                grpc_context.set_code(code)
                grpc_context.set_details(message)
                return response_type()

        return wrapper

    return decorate

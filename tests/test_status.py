"""Every exception maps to one gRPC status; unexpected ones to INTERNAL with a logged error id."""

from __future__ import annotations

import logging
import pickle

import grpc
import pytest

from mlipserve.errors import (
    InvalidSystemError,
    LimitExceededError,
    ModelNotFoundError,
    ModelUnavailableError,
    PermissionDeniedError,
    RateLimitedError,
    ReplicaLostError,
    ServerBusyError,
    SessionIdleError,
    SystemTooLargeError,
    UnauthenticatedError,
    UnsupportedElementError,
)
from mlipserve.status import status_for


@pytest.mark.parametrize(("error", "code"), [
    (InvalidSystemError("systems[0].cell", "singular"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedElementError("systems[0].atomic_numbers[3]", "no Og"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError("x", ["a", "b"]), grpc.StatusCode.NOT_FOUND),
    (ModelUnavailableError("x", "failed to load: no file"), grpc.StatusCode.UNAVAILABLE),
    (ServerBusyError("x", 5000, 1.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SystemTooLargeError("systems[0]", 10**6, 50_000), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_known_errors_keep_their_message(error, code):
    status = status_for(error)
    got, message = status.code, status.message
    assert got is code
    if not isinstance(error, TimeoutError):
        assert message == str(error)
    # They cross process boundaries (Ray) intact.
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_unexpected_error_is_internal_with_a_logged_id(caplog):
    with caplog.at_level(logging.ERROR, logger="mlipserve"):
        status = status_for(KeyError("positions_tensor"))
    code, message = status.code, status.message
    assert code is grpc.StatusCode.INTERNAL
    error_id = message.split("(id ")[1].split(")")[0]
    assert "positions_tensor" not in message and "Traceback" not in message
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert record.exc_info[0] is KeyError


def test_remote_errors_are_unwrapped():
    from ray.exceptions import RayTaskError

    cause = ModelNotFoundError("x", ["a"])
    wrapped = RayTaskError("compute", "Traceback ...", cause)
    assert (status_for(wrapped).code, status_for(wrapped).message) == (grpc.StatusCode.NOT_FOUND, str(cause))


@pytest.mark.parametrize(("error", "code", "retry"), [
    (ServerBusyError("x", 5000, 1.5), grpc.StatusCode.RESOURCE_EXHAUSTED, "1500"),
    (RateLimitedError("alice", 2.0, 0.25), grpc.StatusCode.RESOURCE_EXHAUSTED, "250"),
    (ReplicaLostError("gone"), grpc.StatusCode.UNAVAILABLE, "1000"),
    (LimitExceededError("systems", "the number of systems", 5000, 1000, "server.limits.max_systems_per_request"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    (UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED, None),
    (PermissionDeniedError("bob", "m"), grpc.StatusCode.PERMISSION_DENIED, None),
])
def test_retry_hints_travel_only_where_retrying_helps(error, code, retry):
    """RESOURCE_EXHAUSTED with retry-after-ms is worth retrying (queue full, rate limit); without it
    (a size limit) it is not."""
    status = status_for(error)
    assert status.code is code
    hint = dict(status.trailing_metadata()).get("retry-after-ms")
    assert hint == retry


def test_ray_errors_become_unavailable_without_ray_text():
    from ray.exceptions import ActorDiedError

    status = status_for(ActorDiedError())
    assert status.code is grpc.StatusCode.UNAVAILABLE and "actor" not in status.message.lower()


def test_idle_session_closes_with_its_trailer():
    status = status_for(SessionIdleError(300))
    assert status.code is grpc.StatusCode.DEADLINE_EXCEEDED and "300 s" in status.message
    assert ("mlipserve-session", "idle") in status.trailing_metadata()

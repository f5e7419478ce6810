"""Every exception maps to one gRPC status; unexpected ones to INTERNAL with a logged error id."""

from __future__ import annotations

import logging
import pickle

import grpc
import pytest

from mlipserve.errors import (
    InvalidSystemError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServerBusyError,
    SystemTooLargeError,
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
    got, message = status_for(error)
    assert got is code
    if not isinstance(error, TimeoutError):
        assert message == str(error)
    # They cross process boundaries (Ray) intact.
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_unexpected_error_is_internal_with_a_logged_id(caplog):
    with caplog.at_level(logging.ERROR, logger="mlipserve"):
        code, message = status_for(KeyError("positions_tensor"))
    assert code is grpc.StatusCode.INTERNAL
    error_id = message.split("(id ")[1].split(")")[0]
    assert "positions_tensor" not in message and "Traceback" not in message
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert record.exc_info[0] is KeyError


def test_remote_errors_are_unwrapped():
    from ray.exceptions import RayTaskError

    cause = ModelNotFoundError("x", ["a"])
    wrapped = RayTaskError("compute", "Traceback ...", cause)
    assert status_for(wrapped) == (grpc.StatusCode.NOT_FOUND, str(cause))

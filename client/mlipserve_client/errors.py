"""Exceptions of the client, as ASE's own calculator exception types.

No grpc import here: the server raises ``InvalidSystemError`` from code that must not need grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ase.calculators.calculator import CalculationFailed, InputError

if TYPE_CHECKING:
    import grpc


class InvalidSystemError(InputError, ValueError):
    """A system or request field is malformed; ``field`` is its path, e.g. ``systems[2].positions[5]``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # errors cross process boundaries (Ray) by pickling
        return type(self), (self.field, self.message)


class ServiceError(CalculationFailed):
    """The service answered with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self):
        return type(self), (self.code, self.details)


class ServiceInputError(ServiceError, InputError):
    """The service rejected the request (INVALID_ARGUMENT, NOT_FOUND): fix the input, don't retry."""

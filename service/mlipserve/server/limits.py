"""Request limits, checked on the decoded message before any array is built: a request for 10^6
atoms or 10^4 systems is refused in microseconds, naming the limit and the setting that raises it."""

from __future__ import annotations

from collections.abc import Sequence

from mlipserve.config import Limits
from mlipserve.errors import InvalidSystemError, LimitExceededError
from mlipserve_client.v1 import compute_pb2, system_pb2

# Model ids are short names; a longer one is a mistake or an attack, and is never echoed in full.
MAX_MODEL_ID_CHARS = 256
_MIB = 1024 * 1024


def transport_limit_bytes(limits: Limits) -> int:
    """What gRPC itself accepts: a margin above the limit, so that a request just over it is refused
    by ``check_message_size`` with a message that names the setting."""
    return int(limits.max_message_mb * _MIB * 1.25) + _MIB


def check_message_size(size: int, limits: Limits) -> None:
    limit = limits.max_message_mb * _MIB
    if size > limit:
        raise LimitExceededError("request", "the message size in MiB", size / _MIB, limits.max_message_mb,
                                 "server.limits.max_message_mb")


def check_model_id(model: str) -> None:
    if not model:
        raise InvalidSystemError("model", "no model id given; ListModels shows the available ones")
    if len(model) > MAX_MODEL_ID_CHARS:
        raise InvalidSystemError("model", f"the model id is {len(model):,} characters long (at most "
                                          f"{MAX_MODEL_ID_CHARS}); ListModels shows the available ones")


def check_compute_limits(message: compute_pb2.ComputeRequest, limits: Limits) -> None:
    """Systems per request, atoms per system and atoms per request."""
    check_model_id(message.model)
    check_system_limits(message.systems, limits)


def check_system_limits(systems: Sequence[system_pb2.System], limits: Limits, field: str = "systems") -> None:
    """The systems of a request, named ``field`` (a workflow's: structures), against the limits."""
    if len(systems) > limits.max_systems_per_request:
        raise LimitExceededError(field, f"the number of {field}", len(systems), limits.max_systems_per_request,
                                 "server.limits.max_systems_per_request")
    total = 0
    for i, system in enumerate(systems):
        n = len(system.atomic_numbers)
        if n > limits.max_atoms_per_system:
            raise LimitExceededError(f"{field}[{i}]", "the number of atoms", n, limits.max_atoms_per_system,
                                     "server.limits.max_atoms_per_system")
        total += n
    if total > limits.max_atoms_per_request:
        raise LimitExceededError(field, "the number of atoms in the request", total,
                                 limits.max_atoms_per_request, "server.limits.max_atoms_per_request")

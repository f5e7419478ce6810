"""The server's exception types. No grpc here: status codes are assigned in ``mlipserve.status``.

Every exception carries what a chemist needs to fix the request (field, atom indices, limits).
"""

from __future__ import annotations

from collections.abc import Sequence

from mlipserve_client.errors import InvalidSystemError

__all__ = [
    "DeviceOutOfMemory",
    "InvalidSystemError",
    "LimitExceededError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "PermissionDeniedError",
    "RateLimitedError",
    "ReplicaLostError",
    "ServerBusyError",
    "ServerDrainingError",
    "SessionIdleError",
    "SystemTooLargeError",
    "UnauthenticatedError",
    "UnsupportedElementError",
    "UnsupportedPropertyError",
]


class UnsupportedElementError(InvalidSystemError):
    """The model was not trained on an element of the system."""


class UnsupportedPropertyError(InvalidSystemError):
    """The model cannot compute a requested property."""


class ModelNotFoundError(LookupError):
    def __init__(self, model: str, available: Sequence[str]) -> None:
        self.model = model
        self.available = tuple(available)
        super().__init__(f"unknown model {model!r}; available: {', '.join(self.available) or 'none'}")

    def __reduce__(self):
        return type(self), (self.model, self.available)


class UnknownHealthServiceError(ModelNotFoundError):
    """A health check named a service this server does not have."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(model, available)
        self.args = (f"unknown health service {model!r}; known: {', '.join(self.available)}",)


class ModelUnavailableError(RuntimeError):
    """The model exists but cannot answer now (loading, or failed to load)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r} is unavailable: {reason}")

    def __reduce__(self):
        return type(self), (self.model, self.reason)


class ServerBusyError(RuntimeError):
    """The model's queue is full; the client should retry after ``retry_after_s``."""

    def __init__(self, model: str, queued_atoms: int, retry_after_s: float) -> None:
        self.model = model
        self.queued_atoms = queued_atoms
        self.retry_after_s = retry_after_s
        super().__init__(
            f"model {model!r} is busy ({queued_atoms} atoms queued); retry in {retry_after_s:.1f} s"
        )

    def __reduce__(self):
        return type(self), (self.model, self.queued_atoms, self.retry_after_s)


class SystemTooLargeError(RuntimeError):
    """One system alone exceeds what the model's device can hold."""

    def __init__(self, field: str, n_atoms: int, limit: int) -> None:
        self.field = field
        self.n_atoms = n_atoms
        self.limit = limit
        super().__init__(f"{field}: {n_atoms} atoms is more than this model's device can hold (limit {limit})")

    def __reduce__(self):
        return type(self), (self.field, self.n_atoms, self.limit)


class DeviceOutOfMemory(RuntimeError):
    """A batch did not fit the device: CUDA ran out of memory, or on CPU the batch's predicted memory
    exceeded the configured ceiling. The batcher splits the batch and retries."""

    def __init__(self, work: float, detail: str, capacity: float | None = None) -> None:
        self.work = work
        self.detail = detail
        self.capacity = capacity  # the work that would fit, where known (CPU ceiling)
        super().__init__(f"batch of work {work:.3g} does not fit the device: {detail}")

    def __reduce__(self):
        return type(self), (self.work, self.detail, self.capacity)


class LimitExceededError(RuntimeError):
    """A request is larger than a configured limit of the server. Not retryable as it is: the
    message says which limit, its value, and how the operator raises it."""

    def __init__(self, field: str, what: str, value: float, limit: float, setting: str) -> None:
        self.field = field
        self.what = what
        self.value = value
        self.limit = limit
        self.setting = setting
        super().__init__(f"{field}: {what} is {value:,.0f}, over this server's limit of {limit:,.0f} "
                         f"(split the request, or raise {setting} on the server)")

    def __reduce__(self):
        return type(self), (self.field, self.what, self.value, self.limit, self.setting)


class UnauthenticatedError(RuntimeError):
    """No bearer token, or one the server does not know. The message never contains the token."""

    def __init__(self, message: str, reason: str = "invalid_token") -> None:
        self.reason = reason  # missing_token | invalid_token (a metrics label: never the token)
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.reason)


class PermissionDeniedError(RuntimeError):
    """A valid token that is not allowed the model it asked for."""

    def __init__(self, principal: str, model: str) -> None:
        self.principal = principal
        self.model = model
        super().__init__(f"token {principal!r} is not allowed to use model {model!r}")

    def __reduce__(self):
        return type(self), (self.principal, self.model)


class RateLimitedError(RuntimeError):
    """A token sent more requests per second than it is allowed; retry after ``retry_after_s``."""

    def __init__(self, principal: str, rate: float, retry_after_s: float) -> None:
        self.principal = principal
        self.rate = rate
        self.retry_after_s = retry_after_s
        super().__init__(f"token {principal!r} is over its limit of {rate:g} requests/s; "
                         f"retry in {retry_after_s:.2f} s")

    def __reduce__(self):
        return type(self), (self.principal, self.rate, self.retry_after_s)


class ReplicaLostError(RuntimeError):
    """The replica computing a request died, and no other answered within the request's deadline."""


class SessionIdleError(TimeoutError):
    """An MD session sent no step for its idle timeout; the server closed it (the client reopens)."""

    trailers = (("mlipserve-session", "idle"),)

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        super().__init__(f"the session sent no step for {idle_s:g} s and was closed; open a new one")

    def __reduce__(self):
        return type(self), (self.idle_s,)


class ServerDrainingError(RuntimeError):
    """This front door is shutting down; another (or the restarted one) takes the call."""

    retry_after_s = 0.5

    def __init__(self) -> None:
        super().__init__("this server is shutting down; reconnect and retry")

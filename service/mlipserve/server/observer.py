"""What the front door tells about its calls: a small observer protocol, and the bookkeeping of one
call that feeds it.

The front door imports no metrics library: a replica passes an observer that publishes metrics
(mlipserve.metrics.RequestMetrics); without one, NO_OBSERVER drops everything. Labels are bounded
here, before an observer sees them: a model is one of the engine's model ids, UNKNOWN_MODEL for
anything else (a 10 kB bogus id never becomes a label) or NO_MODEL where the RPC names none
(ListModels); a code is a grpc.StatusCode name; an RPC is a method name of the service.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from mlipserve.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError

UNKNOWN_MODEL = "unknown"
NO_MODEL = ""


@dataclass(frozen=True)
class Exchange:
    """One request message and its answer: a unary call, or one message of a Simulate stream."""

    rpc: str
    model: str
    bytes_in: int
    bytes_out: int  # 0: refused (the call ended with an error status)
    seconds: float  # from the message's arrival to its answer or refusal
    serialization_s: float  # of which the front door's own work: decode, validation, encode
    step: bool = False  # an MD session's step


class RequestObserver(Protocol):
    def call_started(self, rpc: str) -> None:
        """A call began; it is in flight until call_finished (a Simulate stream while it is open)."""
        ...

    def call_finished(self, rpc: str, model: str, code: str) -> None:
        """A call started ended with status ``code``."""
        ...

    def exchanged(self, exchange: Exchange) -> None: ...

    def session_opened(self, model: str) -> None: ...

    def session_closed(self, model: str) -> None: ...

    def auth_failed(self, reason: str) -> None:
        """A call refused for its token: missing_token, invalid_token, rate_limited, model_not_allowed."""
        ...


class NullObserver:
    def call_started(self, rpc: str) -> None:
        pass

    def call_finished(self, rpc: str, model: str, code: str) -> None:
        pass

    def exchanged(self, exchange: Exchange) -> None:
        pass

    def session_opened(self, model: str) -> None:
        pass

    def session_closed(self, model: str) -> None:
        pass

    def auth_failed(self, reason: str) -> None:
        pass


NO_OBSERVER = NullObserver()


def auth_failure_reason(error: BaseException) -> str | None:
    """The auth_failed reason for ``error``, or None when it is not a refusal of the caller's token."""
    if isinstance(error, UnauthenticatedError):
        return error.reason
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, PermissionDeniedError):
        return "model_not_allowed"
    return None


def code_name(context: grpc.aio.ServicerContext, default: str = "OK") -> str:
    """The status an RPC ended with: what it aborted with, else ``default``."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class Call:
    """One RPC as its observer sees it: messages in and out, time in the engine, model, status."""

    def __init__(self, observer: RequestObserver, models: frozenset[str], rpc: str, model: str = UNKNOWN_MODEL) -> None:
        self._observer = observer
        self._models = models
        self.rpc = rpc
        self.model = model
        self._received: tuple[int, float] | None = None  # (bytes, arrival) of the message being handled
        self._engine_s = 0.0
        observer.call_started(rpc)

    def name_model(self, model: str) -> None:
        self.model = model if model in self._models else UNKNOWN_MODEL

    def received(self, size: int) -> None:
        self._received, self._engine_s = (size, time.perf_counter()), 0.0

    @contextlib.contextmanager
    def in_engine(self) -> Iterator[None]:
        """Time spent in here is the engine's (queue, model, corrections), not the front door's."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._engine_s += time.perf_counter() - start

    def answered(self, size: int, step: bool = False) -> None:
        if self._received is None:
            return
        (bytes_in, arrival), self._received = self._received, None
        seconds = time.perf_counter() - arrival
        self._observer.exchanged(Exchange(self.rpc, self.model, bytes_in, size, seconds,
                                          max(0.0, seconds - self._engine_s), step))

    def failed(self, error: BaseException) -> None:
        reason = auth_failure_reason(error)
        if reason is not None:
            self._observer.auth_failed(reason)

    def finish(self, code: str) -> None:
        """The call ended with ``code``; a message still unanswered was refused."""
        self.answered(0)
        self._observer.call_finished(self.rpc, self.model, code)


class Calls:
    """Starts the Calls of one front door: its observer and the model ids labels may name."""

    def __init__(self, observer: RequestObserver, model_ids: Iterable[str]) -> None:
        self.observer = observer
        self.models = frozenset(model_ids)

    def start(self, rpc: str, model: str = UNKNOWN_MODEL) -> Call:
        return Call(self.observer, self.models, rpc, model)

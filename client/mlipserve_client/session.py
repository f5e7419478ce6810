"""Session: one system stepped through an MD run over one Simulate stream.

``step(positions, cell=None)`` sends one geometry and waits for its result; the species, pbc,
charge, model and properties were sent once at open. A session broken by a server restart or a lost
replica (UNAVAILABLE), closed for being idle, or refused for a full queue, is reopened at the
current geometry and the step resent, within the step's deadline: the MD code notices only the
delay. Steps are answered in order, so one outstanding step at a time is all a session needs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import numpy as np

from mlipserve_client import convert
from mlipserve_client.retries import FIRST_BACKOFF_S, MAX_BACKOFF_S, raise_service_error, retry_delay
from mlipserve_client.types import Correction, Property, Result, System
from mlipserve_client.v1 import session_pb2


class Connection(Protocol):
    """What a session needs of its MLIPClient: the stub, the call metadata (token), the defaults."""

    stub: Any
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    retries: bool

IDLE_KEY = "mlipserve-session"


def _reopen_delay(err: grpc.RpcError, backoff: float) -> float | None:
    """How long to wait before reopening after ``err``, or None when reopening cannot help."""
    if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and (IDLE_KEY, "idle") in tuple(err.trailing_metadata() or ()):
        return 0.0
    return retry_delay(err, backoff)


class _Stream:
    """One Simulate call: a request queue feeding the call, and its response iterator."""

    _END = object()

    def __init__(self, client: Connection, opening: session_pb2.SessionOpen) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(session_pb2.SessionRequest(open=opening))
        self.call = client.stub.Simulate(iter(self._requests.get, self._END), metadata=client.metadata)

    def send(self, message: session_pb2.SessionRequest) -> None:
        self._requests.put(message)

    def receive(self, timeout: float) -> session_pb2.SessionResponse:
        """The next response; the call is cancelled (DEADLINE_EXCEEDED for us) if none comes in time."""
        watchdog = threading.Timer(max(timeout, 0.001), self.call.cancel)
        watchdog.start()
        try:
            return next(self.call)
        except StopIteration:
            raise RuntimeError("the server ended the session without a status") from None
        finally:
            watchdog.cancel()

    def close(self) -> None:
        self._requests.put(self._END)
        self.call.cancel()


class Session:
    """An open MD session with ``model`` for ``system``; see the module docstring."""

    def __init__(self, client: Connection, system: System, properties: frozenset[Property], *, model: str,
                 task: str = "", corrections: Sequence[Correction] = (), timeout: float | None = None) -> None:
        self.client = client
        self.system = system
        self.properties = properties
        self.model = model
        self.task = task
        self.corrections = tuple(corrections)
        self.timeout = timeout or client.timeout
        self.steps = 0  # steps answered
        self.opens = 0  # streams opened: 1, plus one per reopen
        self.opened: session_pb2.SessionOpened | None = None
        self._stream: _Stream | None = None
        self._server_cell: np.ndarray | None = None  # the cell the server's side of the session has
        self._with_retries(lambda deadline: None)

    def _open(self, deadline: float) -> None:
        opening = session_pb2.SessionOpen(
            model=self.model, system=convert.system_to_proto(self.system),
            properties=convert.properties_to_proto(self.properties), task=self.task,
            corrections=[convert.correction_to_proto(c) for c in self.corrections])
        stream = _Stream(self.client, opening)
        try:
            response = stream.receive(deadline - time.monotonic())
        except BaseException:
            stream.close()
            raise
        self._stream, self.opened, self._server_cell = stream, response.opened, self.system.cell
        self.opens += 1

    def _with_retries(self, attempt):
        """``attempt(deadline)`` on an open stream, reopening the session as often as it is broken
        within one deadline."""
        deadline = time.monotonic() + self.timeout
        backoff = FIRST_BACKOFF_S
        while True:
            try:
                if self._stream is None:
                    self._open(deadline)
                return attempt(deadline)
            except grpc.RpcError as err:
                if err.code() is grpc.StatusCode.CANCELLED and time.monotonic() >= deadline:
                    raise_service_error(err, grpc.StatusCode.DEADLINE_EXCEEDED, "the step did not finish in time")
                delay = _reopen_delay(err, backoff) if self.client.retries else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise_service_error(err)
                self.close()
                time.sleep(delay)
                backoff = min(2 * backoff, MAX_BACKOFF_S)

    def step(self, positions: np.ndarray, cell: np.ndarray | None = None) -> Result:
        """Energy, forces (and the other properties of the session) at ``positions``."""
        changed = cell is not None and (self.system.cell is None or not np.array_equal(cell, self.system.cell))
        self.system = convert.system_moved(self.system, np.asarray(positions, dtype=np.float64).ravel(),
                                           np.asarray(cell, dtype=np.float64).ravel() if changed else ())
        number = self.steps

        def attempt(deadline: float) -> Result:
            # A reopened session already starts at the current cell.
            cell_changed = self.system.cell is not None and not np.array_equal(self.system.cell, self._server_cell)
            self._stream.send(session_pb2.SessionRequest(step=session_pb2.SessionStep(
                step=number, positions=self.system.positions.ravel().tolist(),
                cell=self.system.cell.ravel().tolist() if cell_changed else [])))
            response = self._stream.receive(deadline - time.monotonic())
            if response.result.step != number:
                raise RuntimeError(f"the server answered step {response.result.step} for step {number}")
            self._server_cell = self.system.cell
            return convert.result_from_proto(response.result.result, self.system.n_atoms)

        result = self._with_retries(attempt)
        self.steps += 1
        return result

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

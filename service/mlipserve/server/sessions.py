"""Simulate: MD sessions on one bidirectional stream.

A session is opened once (model, task, corrections, properties, species, pbc, charge: checked once,
like a Compute request), then each step sends positions (and the cell when it changed) and gets its
result on the same stream, in order. Each step is a one-system ComputeRequest tagged with the
session's id in the same model queue as unary calls, so steps of many sessions and unary requests
share forward passes; the model replica may keep a neighbour list per session (mlipserve.neighbours).

A session lives in the front door that accepted its stream (one stream, one connection): its steps
go to that replica's own models, where its state is, without being routed again. Sessions close
after ``session_idle_timeout_s`` without a step (DEADLINE_EXCEEDED, ``mlipserve-session: idle``);
at most ``max_sessions_per_token`` are open per token and ``max_sessions`` per front door.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import uuid
from collections.abc import AsyncIterator

import grpc

from mlipserve.config import ServerConfig
from mlipserve.errors import InvalidSystemError, LimitExceededError, ServerDrainingError, SessionIdleError
from mlipserve.geometry import check_geometry
from mlipserve.server.auth import current_principal
from mlipserve.server.servicer import MLIPServicer, decode, prepare, reported
from mlipserve_client import convert
from mlipserve_client.types import ComputeRequest, ModelInfo, Property
from mlipserve_client.v1 import session_pb2


@dataclasses.dataclass
class Session:
    id: str
    owner: str  # the token's name ("" without authentication)
    request: ComputeRequest  # model, properties, corrections, and its one system as last moved
    info: ModelInfo
    max_neighbours_per_atom: float
    steps: int = 0

    def at(self, step: session_pb2.SessionStep) -> ComputeRequest:
        where = f"step {step.step}"
        system = convert.system_moved(self.request.systems[0], step.positions, step.cell, where)
        check_geometry(system, where, self.info.cutoff, self.max_neighbours_per_atom)
        if len(step.cell):
            # The cell persists: later steps that send none keep this one.
            self.request = dataclasses.replace(self.request, systems=(system,))
        return dataclasses.replace(self.request, systems=(system,))


class SessionServicer:
    def __init__(self, api: MLIPServicer, config: ServerConfig) -> None:
        self.api = api
        self.config = config
        self.open_sessions: dict[str, Session] = {}
        self._per_principal: collections.Counter[str] = collections.Counter()
        self._draining = asyncio.Event()

    async def drain(self) -> None:
        """End every open session with UNAVAILABLE once its current step is answered: its client
        reopens it on another front door (or this one restarted) rather than waiting out the drain."""
        self._draining.set()

    def handler(self) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(self.simulate)

    async def _next(self, requests: AsyncIterator[bytes]) -> bytes | None:
        """The next message, None when the client closed its side; SessionIdleError after the idle
        timeout, ServerDrainingError once draining. A pending read is left to end with the call, not
        cancelled: a cancelled read keeps the call alive in gRPC until the client moves, which would
        hold a drain for its whole grace."""
        read = asyncio.ensure_future(anext(requests))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            done, _ = await asyncio.wait((read, draining), timeout=self.config.session_idle_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            read.cancel()  # the client went away: its call ends anyway
            raise
        finally:
            draining.cancel()
        if read in done:
            try:
                return read.result()
            except StopAsyncIteration:
                return None
        read.add_done_callback(_consume)
        if draining in done:
            raise ServerDrainingError()
        raise SessionIdleError(self.config.session_idle_timeout_s)

    async def _open(self, message: session_pb2.SessionOpen) -> Session:
        if not message.HasField("system"):
            raise InvalidSystemError("open.system", "a session needs its system (atomic numbers, positions, cell, pbc)")
        info = await self.api.available_info(message.model)
        system = convert.system_from_proto(message.system, "open.system")
        properties = convert.properties_from_proto(message.properties)
        if not message.properties and system.is_periodic and system.pbc.all():
            properties = properties | {Property.STRESS}
        request = ComputeRequest(
            model=message.model, systems=(system,), properties=properties, task=message.task,
            corrections=tuple(convert.correction_from_proto(c, f"open.corrections[{i}]")
                              for i, c in enumerate(message.corrections)))
        request = prepare(info, request, self.api.limits)
        principal = current_principal.get()
        owner = principal.name if principal is not None else ""
        if len(self.open_sessions) >= self.config.max_sessions:
            raise LimitExceededError("open", "the number of open sessions", len(self.open_sessions) + 1,
                                     self.config.max_sessions, "server.max_sessions")
        if principal is not None and self._per_principal[owner] >= self.config.max_sessions_per_token:
            raise LimitExceededError("open", f"the number of sessions open with token {owner!r}",
                                     self._per_principal[owner] + 1, self.config.max_sessions_per_token,
                                     "server.max_sessions_per_token")
        session_id = uuid.uuid4().hex
        session = Session(session_id, owner, dataclasses.replace(request, session=session_id), info,
                          self.api.limits.max_neighbours_per_atom)
        self.open_sessions[session.id] = session
        self._per_principal[owner] += 1
        return session

    def _close(self, session: Session) -> None:
        del self.open_sessions[session.id]
        self._per_principal[session.owner] -= 1
        if not self._per_principal[session.owner]:
            del self._per_principal[session.owner]

    async def simulate(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        session = None
        calls = self.api.calls
        call = calls.start("Simulate")
        async with reported(context, call):
            try:
                if self._draining.is_set():
                    raise ServerDrainingError()
                first = await self._next(requests)
                if first is None:
                    return
                call.received(len(first))
                opening = decode(session_pb2.SessionRequest, first)
                if opening.WhichOneof("kind") != "open":
                    raise InvalidSystemError("open", "a session starts with SessionOpen; a step came first")
                call.name_model(opening.open.model)
                session = await self._open(opening.open)
                calls.observer.session_opened(call.model)
                opened = session_pb2.SessionResponse(opened=session_pb2.SessionOpened(
                    session_id=session.id, model_version=session.info.version,
                    idle_timeout_s=self.config.session_idle_timeout_s,
                    corrections=[c.name for c in session.request.corrections])).SerializeToString()
                call.answered(len(opened))
                yield opened
                while (raw := await self._next(requests)) is not None:
                    call.received(len(raw))
                    message = decode(session_pb2.SessionRequest, raw)
                    if message.WhichOneof("kind") != "step":
                        raise InvalidSystemError("open", "this session is already open: its model, species and pbc "
                                                         "are fixed; open another stream for another system")
                    request = session.at(message.step)
                    with call.in_engine():
                        (result,) = await self.api.engine.compute(request, None)
                    session.steps += 1
                    answer = session_pb2.SessionResponse(result=session_pb2.StepResult(
                        step=message.step.step, result=convert.result_to_proto(result))).SerializeToString()
                    call.answered(len(answer), step=True)
                    yield answer
            finally:
                if session is not None:
                    self._close(session)
                    calls.observer.session_closed(call.model)


def _consume(read: asyncio.Future) -> None:
    """Retrieve the outcome of a read left pending (the call's end), so that it is not reported."""
    if not read.cancelled():
        read.exception()

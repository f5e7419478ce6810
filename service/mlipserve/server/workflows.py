"""The workflow RPCs (Relax, EquationOfState, Elastic, Phonons, Diatomics): server-streaming calls on
raw bytes, like the unary API (mlipserve.server.servicer), over the workflow engine.

A call is checked as a whole first (message size, the number of structures and atoms, the token's
model scope and the model's availability, options, task and corrections): what concerns every
structure fails the call with its status. Then each structure is parsed on its own: a malformed one
gets its own StructureError event and the others run. The engine evaluates through the model's
batch queue (``engine.compute`` of a request ``prepare`` checked, as a Compute call is), so a
workflow's evaluations merge with unary calls and MD sessions of other clients. Cancelling the call
(the client went away, its deadline passed) cancels the handler task, which closes the workflow:
nothing more is submitted and what it had queued is withdrawn. Draining ends calls with UNAVAILABLE,
so that the client resumes the unfinished structures elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc

from mlipserve.config import Limits
from mlipserve.errors import LimitExceededError, ServerDrainingError
from mlipserve.server.limits import check_message_size, check_model_id, check_system_limits
from mlipserve.server.observer import Call
from mlipserve.server.servicer import MLIPServicer, decode, prepare, reported
from mlipserve.status import status_for
from mlipserve.workflows import diatomic_systems, run_workflow
from mlipserve.workflows.runner import DEFAULT_MAX_IN_FLIGHT, DEFAULT_PROGRESS_INTERVAL_S, structure_error
from mlipserve_client import convert
from mlipserve_client.convert_workflows import RPCS, event_to_proto, request_corrections, request_options
from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import DEFAULT_PROPERTIES, ComputeRequest, ModelInfo, Property, Result, System
from mlipserve_client.workflow_types import StructureError, WorkflowEvent, WorkflowOptions, reindexed


def check_evaluation_limits(systems: Sequence[System], limits: Limits) -> None:
    """A workflow makes its own systems (a phonon supercell can be much larger than its structure)."""
    for i, system in enumerate(systems):
        if system.n_atoms > limits.max_atoms_per_system:
            raise LimitExceededError(f"systems[{i}]", "the number of atoms", system.n_atoms,
                                     limits.max_atoms_per_system, "server.limits.max_atoms_per_system")


def with_status(error: StructureError) -> StructureError:
    """The error with the status code it would have as a call of its own (an INTERNAL one with the
    error id the server logs, never the exception's text)."""
    status = status_for(error.error)
    internal = status.code is grpc.StatusCode.INTERNAL
    return dataclasses.replace(error, code=status.code.name, message=status.message if internal else error.message)


@dataclasses.dataclass
class _Workflow:
    """One call's workflow, checked: its options, the structures that parsed (with their indices in
    the request) and the errors of those that did not."""

    info: ModelInfo
    options: WorkflowOptions
    task: str
    corrections: tuple
    structures: list[System]
    indices: list[int]
    unparsed: list[StructureError]

    @property
    def total(self) -> int:
        return len(self.structures) + len(self.unparsed)


class WorkflowServicer:
    def __init__(self, api: MLIPServicer, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 progress_interval_s: float = DEFAULT_PROGRESS_INTERVAL_S) -> None:
        self.api = api
        self.max_in_flight = max_in_flight
        self.progress_interval_s = progress_interval_s
        self._tasks: set[asyncio.Task] = set()
        self._draining = False

    def methods(self) -> dict[str, grpc.RpcMethodHandler]:
        # No (de)serializers: the handlers see raw bytes and write serialized events.
        return {rpc: grpc.unary_stream_rpc_method_handler(functools.partial(self.serve, rpc)) for rpc in RPCS}

    async def drain(self) -> None:
        """End every workflow with UNAVAILABLE: its client resends the unfinished structures."""
        self._draining = True
        for task in list(self._tasks):
            task.cancel()

    async def _checked(self, rpc: str, raw: bytes, call: Call) -> _Workflow:
        limits = self.api.limits
        check_message_size(len(raw), limits)
        message = decode(RPCS[rpc][0], raw)
        call.name_model(message.model)
        check_model_id(message.model)
        check_system_limits(message.structures, limits, "structures")
        info = await self.api.available_info(message.model)
        options = request_options(message)
        corrections = request_corrections(message)
        # Task and corrections concern every structure: refused once, for the whole call.
        prepare(info, ComputeRequest(info.id, (), DEFAULT_PROPERTIES, message.task, corrections), limits)
        structures, indices, unparsed = [], [], []
        given = diatomic_systems(message.elements, message.heteronuclear) if rpc == "Diatomics" else []
        if given and len(given) + len(message.structures) > limits.max_systems_per_request:
            raise LimitExceededError("elements", "the number of dimers", len(given) + len(message.structures),
                                     limits.max_systems_per_request, "server.limits.max_systems_per_request")
        for i, system in enumerate(given):
            structures.append(system)
            indices.append(i)
        for k, proto in enumerate(message.structures):
            index = len(given) + k
            try:
                structures.append(convert.system_from_proto(proto, f"structures[{index}]"))
                indices.append(index)
            except InvalidSystemError as error:
                unparsed.append(with_status(structure_error(index, error)))
        return _Workflow(info, options, message.task, corrections, structures, indices, unparsed)

    def _evaluate(self, workflow: _Workflow, deadline: float | None):
        """The engine's Evaluate: one request on the model's queue, checked as a Compute call is."""
        limits = self.api.limits

        async def evaluate(systems: Sequence[System], properties: frozenset[Property]) -> list[Result]:
            check_evaluation_limits(systems, limits)
            request = prepare(workflow.info, ComputeRequest(workflow.info.id, tuple(systems), properties,
                                                            workflow.task, workflow.corrections), limits)
            return await self.api.engine.compute(request, deadline)

        return evaluate

    async def _events(self, workflow: _Workflow, deadline: float | None) -> AsyncIterator[WorkflowEvent]:
        """The request's events: the structures that did not parse first, then the engine's, as
        events of all the request's structures."""
        for error in workflow.unparsed:
            yield error
        failed = len(workflow.unparsed)
        events = run_workflow(workflow.options, workflow.structures, self._evaluate(workflow, deadline),
                              max_in_flight=self.max_in_flight, progress_interval_s=self.progress_interval_s)
        async with aclosing(events):
            async for event in events:
                event = reindexed(event, workflow.indices, failed, failed, workflow.total)
                yield with_status(event) if isinstance(event, StructureError) else event

    async def serve(self, rpc: str, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        call = self.api.calls.start(rpc)
        call.received(len(raw))
        sent = 0
        try:
            async with reported(context, call, drained=lambda: self._draining):
                if self._draining:
                    raise ServerDrainingError()
                workflow = await self._checked(rpc, raw, call)
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                async with asyncio.timeout(remaining), aclosing(self._events(workflow, deadline)) as events:
                    while True:
                        with call.in_engine():
                            event = await anext(events, None)
                        if event is None:
                            break
                        data = event_to_proto(event).SerializeToString()
                        await context.write(data)
                        sent += len(data)
                call.answered(sent)
        finally:
            self._tasks.discard(task)

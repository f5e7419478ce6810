"""Property workflows on MLIPClient: relax, eos, elastic, phonons and diatomics, many structures in
one streaming call each (mlipserve.v1 Relax, EquationOfState, Elastic, Phonons, Diatomics).

Each method returns one entry per structure, in input order: the workflow's result
(mlipserve_client.workflow_types: RelaxResult, whose ``atoms()`` is the relaxed structure, EOSResult,
ElasticResult, PhononResult, DiatomicResult), or a ``StructureError`` in its place for a structure that
failed alone (its ``code`` is the gRPC status name, ``field`` e.g. ``structures[4].positions[0]``):
nothing is raised for those. A failure of the whole call (unknown model, bad options, a size limit,
the deadline) raises ServiceError or ServiceInputError as ``MLIPClient.compute`` does.

``on_event(event)`` hears every event as it arrives, indices those of the caller's list: progress
(WorkflowProgress), each result or error, and the summary last. ``timeout`` (s) bounds the whole
workflow, retries included. A call the server could not take (UNAVAILABLE: restarting, draining, a
replica lost; RESOURCE_EXHAUSTED with a retry hint) is retried with backoff, and once results have
arrived it is resumed: only the structures without a result are sent again (as are structures that
failed with UNAVAILABLE themselves). Interrupting the call (Ctrl-C, an exception in ``on_event``)
cancels it on the server, which stops the workflow.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import grpc
from ase import Atoms

from mlipserve_client import convert
from mlipserve_client.convert_workflows import event_from_proto, workflow_request
from mlipserve_client.retries import FIRST_BACKOFF_S, MAX_BACKOFF_S, raise_service_error, retry_delay
from mlipserve_client.types import Correction, System
from mlipserve_client.workflow_types import (
    DiatomicOptions,
    DiatomicResult,
    ElasticOptions,
    ElasticResult,
    EOSOptions,
    EOSResult,
    PhononOptions,
    PhononResult,
    RelaxOptions,
    RelaxResult,
    StructureError,
    StructureResult,
    WorkflowEvent,
    WorkflowOptions,
    WorkflowResult,
    diatomic_systems,
    reindexed,
)

logger = logging.getLogger("mlipserve_client")

# A workflow of many structures runs for minutes to hours; a unary call's 60 s would cut it short.
DEFAULT_WORKFLOW_TIMEOUT_S = 3600.0

Structures = Atoms | System | Sequence[Atoms | System]
OnEvent = Callable[[WorkflowEvent], None]


def _systems(structures: Structures) -> list[System]:
    if isinstance(structures, Atoms | System):
        structures = [structures]
    return [s if isinstance(s, System) else convert.system_from_atoms(s) for s in structures]


class _Workflow:
    """One workflow over ``systems`` (for Diatomics: the dimers of ``elements``), retried and
    resumed within one deadline; ``outcomes`` fills in as results and errors arrive."""

    def __init__(self, client, options: WorkflowOptions, systems: list[System], *, model: str, task: str,
                 corrections: Sequence[Correction], elements: Sequence[str], heteronuclear: bool,
                 on_event: OnEvent | None) -> None:
        self.client = client
        self.options = options
        self.protos = [convert.system_to_proto(s) for s in systems]
        self.request = {"model": model, "task": task, "corrections": tuple(corrections)}
        self.elements, self.heteronuclear = tuple(elements), heteronuclear
        self.on_event = on_event
        self.outcomes: dict[int, WorkflowResult | StructureError] = {}

    def _call(self, pending: list[int], timeout: float):
        if self.elements and len(pending) == len(self.protos):
            rpc, request = workflow_request(self.options, (), elements=self.elements, heteronuclear=self.heteronuclear,
                                            **self.request)
        else:  # a resumed Diatomics call sends its unfinished dimers as structures
            rpc, request = workflow_request(self.options, [self.protos[i] for i in pending], **self.request)
        return getattr(self.client.stub, rpc)(request, timeout=timeout, metadata=self.client.metadata)

    def _attempt(self, deadline: float) -> dict[int, StructureError]:
        """One call over the structures without an outcome; returns those that failed with
        UNAVAILABLE themselves (worth another try)."""
        pending = [i for i in range(len(self.protos)) if i not in self.outcomes]
        failed = sum(isinstance(o, StructureError) for o in self.outcomes.values())
        unavailable: dict[int, StructureError] = {}
        call = self._call(pending, max(deadline - time.monotonic(), 0.001))
        try:
            for message in call:
                event = reindexed(event_from_proto(message), pending, len(self.protos) - len(pending), failed,
                                  len(self.protos))
                if isinstance(event, StructureResult):
                    self.outcomes[event.index] = event.result
                elif isinstance(event, StructureError):
                    if event.code == grpc.StatusCode.UNAVAILABLE.name and self.client.retries:
                        unavailable[event.index] = event
                    else:
                        self.outcomes[event.index] = event
                if self.on_event is not None:
                    self.on_event(event)
        finally:
            call.cancel()  # a no-op once the stream ended; otherwise the server stops the workflow
        missing = [i for i in pending if i not in self.outcomes and i not in unavailable]
        if missing:
            raise RuntimeError(f"the server ended the workflow without an outcome for structures {missing}")
        return unavailable

    def run(self, timeout: float) -> list[WorkflowResult | StructureError]:

        deadline = time.monotonic() + timeout
        backoff = FIRST_BACKOFF_S
        while len(self.outcomes) < len(self.protos):
            delay = None
            try:
                unavailable = self._attempt(deadline)
                if unavailable:
                    delay = backoff
                    if time.monotonic() + delay >= deadline:
                        self.outcomes.update(unavailable)
                        break
            except grpc.RpcError as err:
                delay = retry_delay(err, backoff) if self.client.retries else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise_service_error(err)
                logger.info("%s: %s with %d of %d structures done, resuming in %.2f s", self.client.address,
                            err.code().name, len(self.outcomes), len(self.protos), delay)
            if delay is not None:
                time.sleep(delay * random.uniform(0.8, 1.2))
                backoff = min(2 * backoff, MAX_BACKOFF_S)
        return [self.outcomes[i] for i in range(len(self.protos))]


class WorkflowMethods:
    """The workflow methods of MLIPClient (see the module docstring)."""

    def _workflow(self, options: WorkflowOptions, systems: list[System], *, model: str | None, task: str,
                  corrections: Sequence[Correction], timeout: float | None, on_event: OnEvent | None,
                  elements: Sequence[str] = (), heteronuclear: bool = False) -> list:
        model = model or self.model
        if not model:
            raise ValueError("no model given: pass model= here or to MLIPClient")
        workflow = _Workflow(self, options, systems, model=model, task=task, corrections=corrections,
                             elements=elements, heteronuclear=heteronuclear, on_event=on_event)
        return workflow.run(timeout or DEFAULT_WORKFLOW_TIMEOUT_S)

    def relax(self, structures: Structures, options: RelaxOptions | None = None, *, model: str | None = None,
              task: str = "", corrections: Sequence[Correction] = (), timeout: float | None = None,
              on_event: OnEvent | None = None) -> list[RelaxResult | StructureError]:
        """Relax each structure (positions, and the cell of fully periodic ones); ``result.atoms()``
        is the relaxed structure with its energy, forces and stress."""
        return self._workflow(options or RelaxOptions(), _systems(structures), model=model, task=task,
                              corrections=corrections, timeout=timeout, on_event=on_event)

    def eos(self, structures: Structures, options: EOSOptions | None = None, *, model: str | None = None,
            task: str = "", corrections: Sequence[Correction] = (), timeout: float | None = None,
            on_event: OnEvent | None = None) -> list[EOSResult | StructureError]:
        """Birch–Murnaghan equation of state of each (fully periodic) structure, relaxed first."""
        return self._workflow(options or EOSOptions(), _systems(structures), model=model, task=task,
                              corrections=corrections, timeout=timeout, on_event=on_event)

    def elastic(self, structures: Structures, options: ElasticOptions | None = None, *, model: str | None = None,
                task: str = "", corrections: Sequence[Correction] = (), timeout: float | None = None,
                on_event: OnEvent | None = None) -> list[ElasticResult | StructureError]:
        """Elastic tensor and Voigt/Reuss/Hill moduli (GPa) of each (fully periodic) structure."""
        return self._workflow(options or ElasticOptions(), _systems(structures), model=model, task=task,
                              corrections=corrections, timeout=timeout, on_event=on_event)

    def phonons(self, structures: Structures, options: PhononOptions | None = None, *, model: str | None = None,
                task: str = "", corrections: Sequence[Correction] = (), timeout: float | None = None,
                on_event: OnEvent | None = None) -> list[PhononResult | StructureError]:
        """Harmonic phonons of each (fully periodic) structure: Γ, band path, DOS, thermal properties."""
        return self._workflow(options or PhononOptions(), _systems(structures), model=model, task=task,
                              corrections=corrections, timeout=timeout, on_event=on_event)

    def diatomics(self, elements: Sequence[str], options: DiatomicOptions | None = None, *,
                  heteronuclear: bool = False, model: str | None = None, task: str = "",
                  corrections: Sequence[Correction] = (), timeout: float | None = None,
                  on_event: OnEvent | None = None) -> list[DiatomicResult | StructureError]:
        """Dimer energy curves of ``elements`` (symbols), each with itself or, with ``heteronuclear``,
        every pair: one entry per dimer in the order of atomic numbers, (Z1, Z1), (Z1, Z2), ..."""
        elements = [elements] if isinstance(elements, str) else list(elements)
        return self._workflow(options or DiatomicOptions(), diatomic_systems(elements, heteronuclear), model=model,
                              task=task, corrections=corrections, timeout=timeout, on_event=on_event,
                              elements=elements, heteronuclear=heteronuclear)

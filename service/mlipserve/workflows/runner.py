"""Runs one workflow over many structures, a bounded number in flight, and streams typed events.

Design: each structure's workflow is ordinary synchronous ASE / phonopy / pymatgen code in a worker
thread, whose calculator blocks until the event loop has had its evaluation answered by the model's
batch queue (mlipserve.workflows.session). The alternative, driving ``Optimizer.step()`` from async
code with a calculator pre-filled by an awaited evaluation, was built and measured against it here
(2 cores shared with other processes at load ~3, CHGNet in-process, ASE 3.29, one torch thread):

- 16 rattled Si cells relaxed together (450 steps): 39 batches of 11.9 requests on average either
  way (threads need the session's gathering for that: without it they made 77 batches of 6.1).
  Wall time 8.8 s with threads, 6.7 s stepping: a thread hand-off costs ~2-3 ms per step on this
  CPU. Event loop lag at most 15 ms with threads, 78 ms stepping, as the loop runs every step
  itself. (At load ~8 both took ~15 s and lagged ~0.4 s: the machine, not the design.)
- One 500-atom cell, BFGS (a 1500x1500 eigendecomposition per step): loop lag at most 50-77 ms
  with threads, 0.55-1.2 s stepping. The loop serves other clients; that decides it.
- Stepping also needs each optimizer to evaluate exactly once per ``step()`` (FIRE and BFGS do, line
  searches do not), and the strain, displacement and fitting code around it to be rewritten as
  coroutines. With threads, ASE's optimizers, filters and FixSymmetry run unchanged, ``Optimizer.run``
  included, and so do phonopy and pymatgen.

Independent systems of one structure (EOS volumes, strained cells, displaced supercells, dimer
distances) go as one request; structures are merged by the queue. The workflow threads' numpy and
scipy work is on tiny matrices: give the process one BLAS thread (OPENBLAS_NUM_THREADS=1, as Ray's
OMP_NUM_THREADS does), or OpenBLAS's spinning pool slows FrechetCellFilter up to 50x on a busy host.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ase import Atoms

from mlipserve.workflows.diatomics import diatomic
from mlipserve.workflows.elastic import elastic
from mlipserve.workflows.eos import equation_of_state
from mlipserve.workflows.phonons import phonons
from mlipserve.workflows.relax import relax
from mlipserve.workflows.session import Bridge, Evaluate, Session
from mlipserve_client.convert import atoms_from_system
from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import System
from mlipserve_client.validation import validate_system
from mlipserve_client.workflow_types import (
    DiatomicOptions,
    ElasticOptions,
    EOSOptions,
    PhononOptions,
    RelaxOptions,
    StructureError,
    StructureProgress,
    StructureResult,
    WorkflowEvent,
    WorkflowOptions,
    WorkflowProgress,
    WorkflowSummary,
)

logger = logging.getLogger("mlipserve.workflows")

DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_PROGRESS_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Workflow:
    name: str
    run: Callable[[Atoms, Session, WorkflowOptions], object]
    periodic_only: bool  # a cell to strain or displace in


WORKFLOWS: dict[type, Workflow] = {
    RelaxOptions: Workflow("relax", relax, periodic_only=False),
    EOSOptions: Workflow("eos", equation_of_state, periodic_only=True),
    ElasticOptions: Workflow("elastic", elastic, periodic_only=True),
    PhononOptions: Workflow("phonons", phonons, periodic_only=True),
    DiatomicOptions: Workflow("diatomics", diatomic, periodic_only=False),
}


def check_structure(workflow: Workflow, system: System, where: str) -> None:
    validate_system(system, where)
    if workflow.periodic_only and not system.pbc.all():
        raise InvalidSystemError(f"{where}.pbc", f"the {workflow.name} workflow needs a structure periodic along "
                                                 f"a, b and c, got pbc={system.pbc.tolist()}")


def structure_error(index: int, error: BaseException) -> StructureError:
    """The error of one structure, its field re-rooted at ``structures[index]`` (an evaluation's own
    ``systems[k]`` is the k-th system of that structure's request, meaningless to the caller)."""
    where = f"structures[{index}]"
    if not isinstance(error, InvalidSystemError):
        return StructureError(index, where, str(error) or type(error).__name__, type(error).__name__, error)
    field = error.field
    if not field.startswith(where):
        own = re.match(r"systems\[\d+\]", field)
        field = where + (field[own.end():] if own else f".{field}")
    return StructureError(index, field, error.message, type(error).__name__, error)


def _run_one(workflow: Workflow, system: System, session: Session, options: WorkflowOptions):
    return session.run(lambda: workflow.run(atoms_from_system(system), session, options))


class _Run:
    """The state of one workflow run, on the loop: which structures wait, run and are done."""

    def __init__(self, workflow: Workflow, options: WorkflowOptions, structures: Sequence[System],
                 bridge: Bridge, max_in_flight: int) -> None:
        self.workflow = workflow
        self.options = options
        self.structures = structures
        self.bridge = bridge
        self.max_in_flight = max(1, max_in_flight)
        self.start = time.perf_counter()
        self.waiting: collections.deque[int] = collections.deque()
        self.running: dict[int, Session] = {}
        self.finished: asyncio.Queue[StructureResult | StructureError] = asyncio.Queue()
        self.done = self.failed = 0
        self.executor = ThreadPoolExecutor(min(self.max_in_flight, len(structures)) or 1,
                                           thread_name_prefix=f"workflow-{workflow.name}")

    def admit(self) -> None:
        for index, system in enumerate(self.structures):
            try:
                check_structure(self.workflow, system, f"structures[{index}]")
            except InvalidSystemError as error:
                self.finished.put_nowait(structure_error(index, error))
            else:
                self.waiting.append(index)
        self.start_next()

    def start_next(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting and len(self.running) < self.max_in_flight:
            index = self.waiting.popleft()
            session = self.running[index] = Session(index, self.bridge)
            self.bridge.starting()
            future = loop.run_in_executor(self.executor, _run_one, self.workflow, self.structures[index], session,
                                          self.options)
            future.add_done_callback(functools.partial(self.settle, index))

    def settle(self, index: int, future: asyncio.Future) -> None:
        """A structure's thread is done: its event is queued and the next structure starts at once,
        whether or not the consumer has read the event yet."""
        if self.bridge.cancelled:
            return  # the run was closed: nobody reads its events
        self.running.pop(index, None)
        error = future.exception()
        if error is None:
            self.finished.put_nowait(StructureResult(index, future.result()))
        else:
            if not isinstance(error, InvalidSystemError):
                logger.warning("workflow structure %d failed", index, exc_info=error)
            self.finished.put_nowait(structure_error(index, error))
        self.start_next()

    def progress(self) -> WorkflowProgress:
        elapsed = time.perf_counter() - self.start
        total = len(self.structures)
        in_flight = tuple(StructureProgress(i, s.stage, s.step, s.max_force) for i, s in sorted(self.running.items()))
        return WorkflowProgress(self.workflow.name, self.done, self.failed, total, elapsed,
                                elapsed * (total - self.done) / self.done if self.done else None, in_flight)

    def summary(self) -> WorkflowSummary:
        total = len(self.structures)
        return WorkflowSummary(self.workflow.name, total, total - self.failed, self.failed,
                               time.perf_counter() - self.start, self.bridge.evaluations,
                               self.bridge.systems_evaluated)

    def close(self) -> None:
        self.waiting.clear()
        self.bridge.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def run_workflow(options: WorkflowOptions, structures: Sequence[System], evaluate: Evaluate, *,
                       max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                       progress_interval_s: float = DEFAULT_PROGRESS_INTERVAL_S) -> AsyncIterator[WorkflowEvent]:
    """The workflow that ``options`` select, over ``structures``, as events: a WorkflowProgress at the
    start and every ``progress_interval_s``, a StructureResult or StructureError per structure as
    soon as it is done (in completion order), and a WorkflowSummary at the end.

    At most ``max_in_flight`` structures run at once; when one finishes the next starts. Closing the
    iterator (``contextlib.aclosing``) or cancelling the task that iterates stops all work: nothing
    more is submitted and what is queued is withdrawn; events already yielded stay valid.
    """
    workflow = WORKFLOWS.get(type(options))
    if workflow is None:
        raise TypeError(f"no workflow for {type(options).__name__}; options are one of "
                        f"{', '.join(t.__name__ for t in WORKFLOWS)}")
    run = _Run(workflow, options, structures, Bridge(asyncio.get_running_loop(), evaluate), max_in_flight)
    getter: asyncio.Future | None = None
    try:
        run.admit()
        yield run.progress()
        next_progress = time.perf_counter() + progress_interval_s
        while run.done < len(structures):
            # One get() kept across timeouts: cancelling it on a timeout could drop an event.
            getter = getter or asyncio.ensure_future(run.finished.get())
            ready, _ = await asyncio.wait({getter}, timeout=max(0.0, next_progress - time.perf_counter()))
            if not ready:
                yield run.progress()
                next_progress = time.perf_counter() + progress_interval_s
                continue
            event, getter = getter.result(), None
            run.done += 1
            run.failed += isinstance(event, StructureError)
            yield event
        yield run.summary()
    finally:
        if getter is not None:
            getter.cancel()
        run.close()

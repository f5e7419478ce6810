"""The worker-thread side of the engine: a structure's blocking handle on the async model queue.

A workflow runs one structure as plain synchronous ASE/phonopy code in a worker thread. Each model
evaluation it needs is handed to the event loop and the thread waits for the result, so the loop
only ever awaits (see mlipserve.workflows.runner for why).

Gathering. When a batch comes back, every structure in it wakes, takes an optimizer step and
resubmits; the threads do so one after another (they share the GIL), so their requests would trickle
into the queue over tens of ms and split into several small batches. The bridge therefore counts
the structures that are awake ("thinking": between a result and their next request) and holds new
requests until none is, then submits them in one loop callback, where the queue sees them
together. A lone structure never waits. Nor does anyone wait longer than a request takes (the
running mean of submit-to-answer), capped at MAX_GATHER_S: past that, a straggler's request would
be answered sooner in a batch of its own than the others would wait for it.

Taking turns. A worker thread holds ``Bridge.cpu`` while it computes (from an answer to its next
request, and through CPU work such as phonopy's) and releases it while it waits. ASE's steps are
GIL-bound Python: threads stepping at once would only trade the GIL at its 5 ms switch interval,
the loop among them; taking turns at a lock lets each step run through and leaves the GIL to the
loop between steps (16 structures relaxing: loop lag 50 -> 15 ms at most).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from mlipserve.errors import ServerBusyError
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property, Result, System

T = TypeVar("T")
R = TypeVar("R")
# A full queue is momentary back-pressure, not a failure of the structure: wait as told and resubmit.
MAX_BUSY_RETRIES = 20
# How long requests wait for those of other awake structures: before any answer has been timed, and
# at most (see the module docstring).
FIRST_GATHER_S = 0.02
MAX_GATHER_S = 0.5


class Evaluate(Protocol):
    """The model, as the server binds it (model id, task and corrections fixed): one call is one
    ComputeRequest on the model's batch queue, merged there with everyone else's."""

    async def __call__(self, systems: Sequence[System], properties: frozenset[Property]) -> list[Result]: ...


class WorkflowCancelled(Exception):
    """The workflow was cancelled; raised in worker threads at their next evaluation."""


class Bridge:
    """Carries evaluations from one workflow's worker threads to the event loop and back.

    ``evaluate`` and ``thinking`` are called from worker threads, the rest on the loop
    (the worker-side calls hand over with ``call_soon_threadsafe``), so only ``_waiting`` is locked.
    ``cpu`` is the lock worker threads take turns at (see the module docstring).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, evaluate: Evaluate) -> None:
        self._loop = loop
        self._evaluate = evaluate
        self._latency_s: float | None = None  # running mean, submit to answer
        self.cpu = threading.Lock()
        self._lock = threading.Lock()
        self._cancelled = False
        self._waiting: set[Future] = set()  # futures worker threads block on
        self._tasks: set[asyncio.Task] = set()  # their submissions on the loop
        self._held: list[tuple[tuple[System, ...], frozenset[Property], Future]] = []
        self._thinking = 0
        self._timer: asyncio.TimerHandle | None = None
        self.evaluations = 0
        self.systems_evaluated = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # --- worker threads ---------------------------------------------------------------------------

    def evaluate(self, systems: Sequence[System], properties: frozenset[Property]) -> list[Result]:
        """Blocks the calling worker thread (never the loop's), which holds ``cpu``, until the model
        has answered; ``cpu`` is released meanwhile."""
        future: Future = Future()
        with self._lock:
            # Checked and registered under the lock, so that cancel() sees every request.
            if self._cancelled:
                raise WorkflowCancelled()
            self._waiting.add(future)
        self.cpu.release()
        try:
            self._loop.call_soon_threadsafe(self._hold, tuple(systems), properties, future)
            return future.result()
        finally:
            self.cpu.acquire()
            with self._lock:
                self._waiting.discard(future)

    def thinking(self, delta: int) -> None:
        """``delta`` more (or fewer) threads are computing and will soon request an evaluation."""
        self._loop.call_soon_threadsafe(self._think, delta)

    # --- the loop ---------------------------------------------------------------------------------

    def starting(self) -> None:
        """A structure is about to start: counted before its thread runs, so that the first requests
        of structures started together are gathered too."""
        self._think(+1)

    def _hold(self, systems: tuple[System, ...], properties: frozenset[Property], future: Future) -> None:
        self._held.append((systems, properties, future))
        self._think(-1)

    def _think(self, delta: int) -> None:
        self._thinking += delta
        if not self._held:
            return
        if self._thinking <= 0:
            self._release()
        elif self._timer is None:
            gather_s = FIRST_GATHER_S if self._latency_s is None else min(MAX_GATHER_S, self._latency_s)
            self._timer = self._loop.call_later(gather_s, self._release)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for systems, properties, future in held:
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while held
            task = self._loop.create_task(self._submit(systems, properties))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._deliver, future, self._loop.time()))

    def _deliver(self, future: Future, submitted: float, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._thinking += 1  # its thread wakes with the answer
        latency = self._loop.time() - submitted
        self._latency_s = latency if self._latency_s is None else 0.8 * self._latency_s + 0.2 * latency
        if task.cancelled():
            future.set_exception(WorkflowCancelled())
        elif task.exception() is not None:
            future.set_exception(task.exception())
        else:
            future.set_result(task.result())

    async def _submit(self, systems: tuple[System, ...], properties: frozenset[Property]) -> list[Result]:
        for attempt in range(MAX_BUSY_RETRIES + 1):
            try:
                results = await self._evaluate(systems, properties)
                break
            except ServerBusyError as busy:
                if attempt == MAX_BUSY_RETRIES:
                    raise
                await asyncio.sleep(busy.retry_after_s)
        self.evaluations += 1
        self.systems_evaluated += len(systems)
        return results

    def cancel(self) -> None:
        """No more requests; those held or in the model's queue are withdrawn. Call on the loop."""
        with self._lock:
            self._cancelled = True
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()  # held ones: their threads wake with CancelledError
        for task in list(self._tasks):
            task.cancel()  # submitted ones: cancelling the await takes them off the queue
        self._held.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Session:
    """One structure's handle, used from its worker thread: evaluations, an ASE calculator over
    them, and the progress the runner reports."""

    def __init__(self, index: int, bridge: Bridge) -> None:
        self.index = index
        self._bridge = bridge
        self._evaluating = False
        # Written by this structure's threads, read by the loop for progress events.
        self.stage = "queued"
        self.step = 0
        self.max_force: float | None = None

    def run(self, function: Callable[[], R]) -> R:
        """Run the structure's workflow in this (worker) thread (Bridge.starting counted it in)."""
        self._evaluating = True
        self._bridge.cpu.acquire()
        try:
            return function()
        finally:
            self._bridge.cpu.release()
            self.evaluations_done()

    def evaluations_done(self) -> None:
        """What is left is CPU work (fits, phonopy): others' requests need not wait for ours."""
        if self._evaluating:
            self._evaluating = False
            self._bridge.thinking(-1)

    def evaluate(self, systems: Sequence[System], properties: frozenset[Property]) -> list[Result]:
        return self._bridge.evaluate(systems, properties)

    def calculator(self) -> ServedCalculator:
        return ServedCalculator(self)

    def report(self, stage: str | None = None, step: int | None = None, max_force: float | None = None) -> None:
        if stage is not None:
            self.stage = stage
        if step is not None:
            self.step = step
        if max_force is not None:
            self.max_force = max_force

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``function`` over ``items`` concurrently, one thread each, so that independent sequences of
        evaluations (relaxing each strained cell) reach the queue together and merge there."""
        items = list(items)
        if len(items) <= 1:
            return [function(item) for item in items]

        def one(item: T) -> R:
            self._bridge.cpu.acquire()
            try:
                return function(item)
            finally:
                self._bridge.cpu.release()
                self._bridge.thinking(-1)

        # The children think now; this thread only waits for them.
        self._bridge.thinking(len(items) - 1)
        self._bridge.cpu.release()
        try:
            with ThreadPoolExecutor(len(items), thread_name_prefix=f"workflow-{self.index}") as pool:
                return list(pool.map(one, items))
        finally:
            self._bridge.cpu.acquire()
            self._bridge.thinking(+1)


class ServedCalculator(Calculator):
    """An ASE calculator whose every calculation is one evaluation of the session's model: energy and
    forces, and stress for periodic systems, in one pass (ASE then serves them from its cache)."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, session: Session) -> None:
        super().__init__()
        self._session = session

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        system = system_from_atoms(self.atoms)
        wanted = {Property.ENERGY, Property.FORCES} | ({Property.STRESS} if system.is_periodic else set())
        (result,) = self._session.evaluate([system], frozenset(wanted))
        self.results = result.as_ase_results()
        self._session.report(max_force=float(np.linalg.norm(result.forces, axis=1).max()))

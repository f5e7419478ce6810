"""Assembles requests for one model into batches sized by cost, and runs them on compute threads.

Knows nothing of gRPC, Ray or a concrete model: it is given a function that evaluates a Batch and a
function that estimates a system's cost ("work", in the backend's units: ~ atoms + neighbour pairs).

- Requests for the same task and corrections are merged until the batch's work reaches the budget
  or the first request has waited ``max_wait_s``; one request's systems are never split across
  queued batches. Within a batch, no forward pass holds more than the budget (a lone system
  excepted): a request with thousands of systems runs as many passes, never as one that could
  exhaust the device.
- A request whose caller gave up (cancelled, past its deadline) leaves the queue at once, and its
  work stops counting against the queue bound. A lone client never waits: the queue holds a batch open only when requests are
  arriving concurrently (others queued, or the last batch merged several), so merging costs no
  latency at low load and fills batches at high load.
  A budget of 0 never merges.
- Requests above ``large_system_atoms`` run on a lane (thread) of their own, one at a time, so a
  10^5-atom system never holds up the small ones behind it.
- A batch that does not fit the device (DeviceOutOfMemory) is split in halves and retried, down to
  single systems; the queue learns the device's capacity (work that fits) and keeps batches below
  it from then on. A single system that does not fit fails its request with SystemTooLargeError.
- Any other failure of a merged batch reruns its requests one by one, so a bad system fails only the
  request that sent it.
- More queued work than ``max_queued_work`` answers ServerBusyError with a retry hint.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from mlipserve.backends.base import Batch
from mlipserve.errors import DeviceOutOfMemory, ServerBusyError, SystemTooLargeError
from mlipserve_client.types import ComputeRequest, Property, Result, System

logger = logging.getLogger("mlipserve.batching")

EvaluateFn = Callable[[Batch], list[Result]]
CostFn = Callable[[System], float]
# Halving a batch more often than this means even single systems do not fit.
MAX_SPLIT_DEPTH = 16


@dataclass(frozen=True)
class BatchPolicy:
    budget: float  # work per forward pass; 0: no merging, every system its own pass
    max_wait_s: float = 0.005
    max_queued_work: float = 5e7
    large_system_atoms: int = 5000


@dataclass(frozen=True)
class BatchRecord:
    """One executed forward pass: what it held and how long it took."""

    lane: str
    n_requests: int
    n_systems: int
    n_atoms: int
    work: float
    seconds: float
    queued_s: float = 0.0  # how long the batch's first request waited before the pass started
    n_sessions: int = 0  # systems that were steps of MD sessions


class BatchObserver(Protocol):
    """Receives what a BatchQueue does, e.g. to publish metrics."""

    def budget_chosen(self, budget: float) -> None: ...

    def batch_done(self, record: BatchRecord) -> None: ...

    def capacity_learned(self, capacity: float, budget: float) -> None: ...

    def queue_changed(self, queued_work: float) -> None: ...


@dataclass(eq=False)
class PendingRequest:
    request: ComputeRequest
    system_work: tuple[float, ...]  # one per system of the request
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)

    @property
    def work(self) -> float:
        return sum(self.system_work)


@dataclass(frozen=True, eq=False)
class _Unit:
    """One system of one pending request: what a split works on."""

    pending: PendingRequest
    index: int  # in pending.request.systems

    @property
    def system(self) -> System:
        return self.pending.request.systems[self.index]

    @property
    def work(self) -> float:
        return self.pending.system_work[self.index]


class _Lane:
    def __init__(self, name: str, executor: Executor) -> None:
        self.name = name
        self.executor = executor
        self.pending: collections.deque[PendingRequest] = collections.deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.last_batch_requests = 0


class BatchQueue:
    """The queue of compute requests for one model."""

    def __init__(
        self,
        model_id: str,
        evaluate: EvaluateFn,
        cost: CostFn,
        policy: BatchPolicy,
        small_lane: Executor,
        large_lane: Executor,
        observer: BatchObserver | None = None,
        capacity: float = math.inf,
        history: int = 2000,
    ) -> None:
        self.model_id = model_id
        self.policy = policy
        # Work known to fit the device in one pass; learned from out-of-memory failures.
        self.capacity = capacity
        self.budget = min(policy.budget, capacity)
        self._evaluate = evaluate
        self._cost = cost
        self._observer = observer
        self._lanes = {"small": _Lane("small", small_lane), "large": _Lane("large", large_lane)}
        self._queued_work = 0.0
        self._held = 0  # requests submitted and not yet answered
        self._work_per_s: float | None = None
        self._closed = False
        self.history: collections.deque[BatchRecord] = collections.deque(maxlen=history)

    @property
    def queued_work(self) -> float:
        return self._queued_work

    @property
    def requests_held(self) -> int:
        """Requests queued or running: what autoscaling sizes the family on."""
        return self._held

    async def submit(self, request: ComputeRequest) -> list[Result]:
        system_work = tuple(self._cost(s) for s in request.systems)
        work = sum(system_work)
        if self._queued_work and self._queued_work + work > self.policy.max_queued_work:
            raise ServerBusyError(self.model_id, self._queued_work_atoms(), retry_after_s=self._retry_after())
        lane = self._lanes["large" if request.n_atoms > self.policy.large_system_atoms else "small"]
        loop = asyncio.get_running_loop()
        self._closed = False
        if lane.task is None or lane.task.done():
            lane.task = loop.create_task(self._drain(lane), name=f"batch-{self.model_id}-{lane.name}")
        pending = PendingRequest(request, system_work, loop.create_future())
        lane.pending.append(pending)
        self._add_queued(work)
        self._held += 1
        pending.future.add_done_callback(lambda future: self._done(lane, pending, future))
        lane.wakeup.set()
        return await pending.future

    def _done(self, lane: _Lane, pending: PendingRequest, future: asyncio.Future) -> None:
        self._held -= 1
        if future.cancelled():
            self._forget(lane, pending)

    def _forget(self, lane: _Lane, pending: PendingRequest) -> None:
        """A cancelled request still queued leaves the queue (one already running finishes unseen)."""
        try:
            lane.pending.remove(pending)
        except ValueError:
            return
        self._add_queued(-pending.work)

    def _queued_work_atoms(self) -> int:
        return sum(p.request.n_atoms for lane in self._lanes.values() for p in lane.pending)

    def _retry_after(self) -> float:
        if not self._work_per_s:
            return 1.0
        return min(30.0, max(0.1, self._queued_work / self._work_per_s))

    def _add_queued(self, work: float) -> None:
        self._queued_work += work
        if self._observer:
            self._observer.queue_changed(self._queued_work)

    def _pop(self, lane: _Lane) -> PendingRequest | None:
        while lane.pending:
            pending = lane.pending.popleft()
            self._add_queued(-pending.work)
            if not pending.future.done():  # skip requests whose caller gave up (deadline, cancel)
                return pending
        return None

    def close(self) -> None:
        """Stop the lanes once their queued requests are done (a model evicted from a replica)."""
        self._closed = True
        for lane in self._lanes.values():
            lane.wakeup.set()

    async def _next_batch(self, lane: _Lane) -> list[PendingRequest] | None:
        while True:
            first = self._pop(lane)
            if first is not None:
                break
            if self._closed:
                return None
            lane.wakeup.clear()
            await lane.wakeup.wait()
        batch, work = [first], first.work
        if lane.name == "large":
            return batch
        concurrent = bool(lane.pending) or lane.last_batch_requests > 1
        deadline = first.enqueued_at + (self.policy.max_wait_s if concurrent else 0.0)
        while work < self.budget:
            if not lane.pending:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                lane.wakeup.clear()
                try:
                    await asyncio.wait_for(lane.wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            following = lane.pending[0]
            if _batch_key(following.request) != _batch_key(first.request) or work + following.work > self.budget:
                break
            nxt = self._pop(lane)
            if nxt is not None:
                batch.append(nxt)
                work += nxt.work
        return batch

    async def _drain(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch(lane)) is not None:
            lane.last_batch_requests = len(batch)
            try:
                await loop.run_in_executor(lane.executor, self._run, batch, lane.name)
            except Exception:  # noqa: BLE001 - _run settles every future itself; this guards against bugs
                logger.exception("batch of %d requests failed outside evaluation", len(batch))
                for pending in batch:
                    self._settle(pending, error=RuntimeError("internal batching failure"))

    # --- on the compute thread -------------------------------------------------------------------

    def _passes(self, units: list[_Unit]) -> list[list[_Unit]]:
        """``units`` in consecutive groups of at most the budget's work (a lone unit may exceed it)."""
        passes, current, work = [], [], 0.0
        for unit in units:
            if current and work + unit.work > self.budget:
                passes.append(current)
                current, work = [], 0.0
            current.append(unit)
            work += unit.work
        return [*passes, current] if current else passes

    def _run(self, batch: list[PendingRequest], lane: str) -> None:
        units = [_Unit(p, k) for p in batch for k in range(len(p.request.systems))]
        properties = frozenset().union(*(p.request.properties for p in batch))
        results: list[Result] = []
        try:
            for group in self._passes(units):
                if all(u.pending.future.done() for u in group):
                    results.extend([Result()] * len(group))  # every caller of this pass gave up
                    continue
                start = time.perf_counter()
                results.extend(self._evaluate_units(group, properties, batch[0].request, depth=0))
                self._record(BatchRecord(lane, len({id(u.pending) for u in group}), len(group),
                                         sum(u.system.n_atoms for u in group), sum(u.work for u in group),
                                         time.perf_counter() - start, start - batch[0].enqueued_at,
                                         sum(bool(u.pending.request.session) for u in group)))
        except Exception as error:  # noqa: BLE001 - isolated below: a request fails alone
            if len(batch) == 1:
                self._settle(batch[0], error=error)
                return
            logger.info("merged batch of %d requests failed (%s); retrying one by one", len(batch), error)
            for pending in batch:
                self._run([pending], lane)
            return
        by_request: dict[int, list[Result]] = collections.defaultdict(list)
        for unit, result in zip(units, results, strict=True):
            by_request[id(unit.pending)].append(_only(result, unit.pending.request.properties))
        for pending in batch:
            self._settle(pending, results=by_request[id(pending)])

    def _evaluate_units(self, units: list[_Unit], properties: frozenset[Property], like: ComputeRequest,
                        depth: int) -> list[Result]:
        """Evaluate ``units`` with the task and corrections of ``like`` (shared by the whole batch)."""
        work = sum(u.work for u in units)
        if work <= self.capacity or len(units) == 1:
            # Session steps may reuse the neighbour list their replica keeps for the session.
            keys = tuple(u.pending.request.session or None for u in units)
            batch = Batch(tuple(u.system for u in units), properties, like.task, like.corrections,
                          neighbour_keys=keys if any(keys) else ())
            try:
                results = self._evaluate(batch)
            except DeviceOutOfMemory as error:
                self._learn_capacity(error.capacity if error.capacity is not None else work / 2)
                if len(units) == 1 or depth >= MAX_SPLIT_DEPTH:
                    unit = units[0]
                    limit = int(unit.system.n_atoms * min(self.capacity, work) / work) if work else 0
                    raise SystemTooLargeError(f"systems[{unit.index}]", unit.system.n_atoms, limit) from error
                logger.warning("model %s: batch of %d systems (work %.3g) did not fit (%s); splitting",
                               self.model_id, len(units), work, error.detail)
            else:
                if len(results) != len(units):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(units)} systems")
                return results
        half = len(units) // 2
        return (self._evaluate_units(units[:half], properties, like, depth + 1)
                + self._evaluate_units(units[half:], properties, like, depth + 1))

    def _learn_capacity(self, fits: float) -> None:
        if fits < self.capacity:
            self.capacity = fits
            self.budget = min(self.budget, fits)
            if self._observer:
                self._observer.capacity_learned(fits, self.budget)

    def _record(self, record: BatchRecord) -> None:
        self.history.append(record)
        rate = record.work / record.seconds if record.seconds > 0 else None
        if rate:
            self._work_per_s = rate if self._work_per_s is None else 0.8 * self._work_per_s + 0.2 * rate
        if self._observer:
            self._observer.batch_done(record)

    @staticmethod
    def _settle(pending: PendingRequest, results: list[Result] | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if pending.future.done():
                return
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(results)

        pending.future.get_loop().call_soon_threadsafe(settle)


def _batch_key(request: ComputeRequest) -> tuple:
    """Requests share a forward pass only if they ask the same task and corrections."""
    return request.task, request.corrections


def _only(result: Result, properties: frozenset[Property]) -> Result:
    """Drop what a merged batch computed for other requests."""
    return Result(corrections=result.corrections,
                  **{p.value: getattr(result, p.value) if p in properties else None for p in Property})

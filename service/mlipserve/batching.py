"""Assembles requests for one model into batches and runs them on one compute thread.

Knows nothing of gRPC, Ray or a concrete model: it is given a function that evaluates a Batch.
Requests for the same task are merged until the batch holds ``max_batch_atoms`` atoms or the first
request has waited ``max_wait_s``; one request's systems are never split across batches. Each request
gets its own results; if a merged batch fails, its requests are retried one by one so a bad system
fails only the request that sent it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mlipserve.backends.base import Batch
from mlipserve.errors import ServerBusyError
from mlipserve_client.types import ComputeRequest, Property, Result

logger = logging.getLogger("mlipserve.batching")

EvaluateFn = Callable[[Batch], list[Result]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_atoms: int = 0  # 0: every request is its own batch
    max_wait_s: float = 0.0
    max_queued_atoms: int = 1_000_000  # beyond this, submit() answers ServerBusyError


@dataclass(eq=False)
class PendingRequest:
    request: ComputeRequest
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)

    @property
    def n_atoms(self) -> int:
        return self.request.n_atoms


@dataclass(frozen=True)
class BatchRecord:
    """What one executed batch held; kept for metrics and tests of merging."""

    n_requests: int
    n_systems: int
    n_atoms: int
    seconds: float


class BatchQueue:
    """A queue of compute requests for one model, drained by one task into one compute thread."""

    def __init__(self, model_id: str, evaluate: EvaluateFn, policy: BatchPolicy, history: int = 1000) -> None:
        self.model_id = model_id
        self.policy = policy
        self._evaluate = evaluate
        self._pending: collections.deque[PendingRequest] = collections.deque()
        self._queued_atoms = 0
        self._wakeup = asyncio.Event()
        # One thread: torch already uses every core it was given; two batches at once would only
        # contend for them. The event loop stays free to accept and validate requests meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{model_id}")
        self.history: collections.deque[BatchRecord] = collections.deque(maxlen=history)
        self._task: asyncio.Task | None = None

    @property
    def queued_atoms(self) -> int:
        return self._queued_atoms

    async def submit(self, request: ComputeRequest) -> list[Result]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"batch-{self.model_id}")
        if self._queued_atoms and self._queued_atoms + request.n_atoms > self.policy.max_queued_atoms:
            raise ServerBusyError(self.model_id, self._queued_atoms, retry_after_s=1.0)
        pending = PendingRequest(request, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._queued_atoms += pending.n_atoms
        self._wakeup.set()
        return await pending.future

    def _pop(self) -> PendingRequest | None:
        while self._pending:
            pending = self._pending.popleft()
            self._queued_atoms -= pending.n_atoms
            if not pending.future.done():  # skip requests whose caller gave up (deadline, cancel)
                return pending
        return None

    async def _next_batch(self) -> list[PendingRequest]:
        while True:
            first = self._pop()
            if first is not None:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        batch, atoms = [first], first.n_atoms
        deadline = first.enqueued_at + self.policy.max_wait_s
        while atoms < self.policy.max_batch_atoms:
            if not self._pending:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            following = self._pending[0]
            if following.request.task != first.request.task or atoms + following.n_atoms > self.policy.max_batch_atoms:
                break
            nxt = self._pop()
            if nxt is not None:
                batch.append(nxt)
                atoms += nxt.n_atoms
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            try:
                await loop.run_in_executor(self._executor, self._run, batch)
            except Exception:  # noqa: BLE001 - _run sets every error on its futures; this is a bug guard
                logger.exception("batch of %d requests failed outside evaluation", len(batch))

    def _run(self, batch: list[PendingRequest]) -> None:
        """Evaluate a batch on the compute thread and resolve its futures on the event loop."""
        start = time.perf_counter()
        systems = tuple(s for p in batch for s in p.request.systems)
        properties = frozenset().union(*(p.request.properties for p in batch))
        try:
            results = self._evaluate(Batch(systems, properties, batch[0].request.task))
            if len(results) != len(systems):
                raise RuntimeError(f"backend returned {len(results)} results for {len(systems)} systems")
        except Exception as error:  # noqa: BLE001 - isolate the failing request below
            if len(batch) == 1:
                self._resolve(batch[0], error=error)
                return
            logger.info("merged batch of %d requests failed (%s); retrying one by one", len(batch), error)
            for pending in batch:
                self._run([pending])
            return
        self.history.append(BatchRecord(len(batch), len(systems), sum(s.n_atoms for s in systems),
                                        time.perf_counter() - start))
        offset = 0
        for pending in batch:
            n = len(pending.request.systems)
            own = [_only(r, pending.request.properties) for r in results[offset:offset + n]]
            offset += n
            self._resolve(pending, results=own)

    @staticmethod
    def _resolve(pending: PendingRequest, results: list[Result] | None = None,
                 error: BaseException | None = None) -> None:
        def settle() -> None:
            if pending.future.done():
                return
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(results)

        pending.future.get_loop().call_soon_threadsafe(settle)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _only(result: Result, properties: frozenset[Property]) -> Result:
    """Drop what a merged batch computed for other requests."""
    return Result(**{p.value: getattr(result, p.value) if p in properties else None for p in Property})

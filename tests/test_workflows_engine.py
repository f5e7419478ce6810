"""The workflow engine with a batch queue over the real CHGNet backend, in-process: the event stream,
structures of concurrent workflows sharing batches, cancellation, a malformed structure failing
alone, a full queue retried, and an event loop that stays free."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from contextlib import aclosing

import numpy as np
import pytest
from ase.build import bulk
from workflows_support import chgnet_backend, collect, results_by_index, serve, single_threaded  # noqa: F401 - fixtures

from mlipserve.batching import BatchPolicy
from mlipserve.workflows import run_workflow
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import System
from mlipserve_client.workflow_types import (
    EOSOptions,
    RelaxOptions,
    RelaxResult,
    StructureError,
    StructureResult,
    WorkflowProgress,
    WorkflowSummary,
)



def silicon(n: int, seed: int = 0) -> list[System]:
    """Two-atom Si cells, strained and rattled differently, so that they take different numbers of steps."""
    cells = []
    for k in range(n):
        atoms = bulk("Si", "diamond", a=5.35 + 0.03 * k)
        atoms.rattle(0.05, seed=seed + k)
        cells.append(system_from_atoms(atoms))
    return cells


def _replace(system: System, **fields) -> System:
    return System(**{**vars(system), **fields})


def workflow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("workflow-")]


def test_event_stream(chgnet_backend):
    structures = silicon(3)
    events, served = serve(chgnet_backend, lambda s: collect(RelaxOptions(), structures, s.evaluate,
                                                      progress_interval_s=0.05))
    first, *middle, summary = events
    assert isinstance(first, WorkflowProgress) and (first.done, first.total, first.workflow) == (0, 3, "relax")
    results = results_by_index(events)
    assert sorted(results) == [0, 1, 2] and all(isinstance(r, RelaxResult) and r.converged for r in results.values())
    progress = [e for e in middle if isinstance(e, WorkflowProgress)]
    assert progress and any(p.structures and p.structures[0].max_force is not None for p in progress)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert (summary.total, summary.succeeded, summary.failed) == (3, 3, 0)
    assert summary.evaluations == served.requests == sum(r.steps + 1 for r in results.values())
    for event in events:
        json.dumps(event.to_dict(), allow_nan=False)
    atoms = results[0].atoms()
    assert atoms.get_potential_energy() == results[0].energy and atoms.get_stress().shape == (6,)


def test_concurrent_workflows_share_batches(chgnet_backend):
    relaxed, scanned = silicon(4), silicon(2, seed=10)
    own = {}

    async def both(served):
        async def tagged(tag, systems, properties):
            own.update((id(s), tag) for s in systems)
            return await served.evaluate(systems, properties)

        lags, running = [], True

        async def ticker():
            while running:
                start = time.perf_counter()
                await asyncio.sleep(0.002)
                lags.append(time.perf_counter() - start - 0.002)

        tick = asyncio.create_task(ticker())
        relax, eos = await asyncio.gather(
            collect(RelaxOptions(fmax=0.01), relaxed, lambda s, p: tagged("relax", s, p)),
            collect(EOSOptions(relax=RelaxOptions(fmax=0.01)), scanned, lambda s, p: tagged("eos", s, p)))
        running = False
        await tick
        return relax, eos, max(lags)

    (relax, eos, lag), served = serve(chgnet_backend, both, BatchPolicy(budget=math.inf, max_wait_s=0.02))
    assert len(results_by_index(relax)) == 4 and len(results_by_index(eos)) == 2
    mixed = [b for b in served.batches if {own[id(s)] for s in b.systems} == {"relax", "eos"}]
    assert mixed, [len(b.systems) for b in served.batches]
    assert max(r.n_requests for r in served.queue.history) >= 4
    # one request of 11 volumes per structure, not 11 requests
    assert any(len(b.systems) >= 11 for b in served.batches)
    assert lag < 0.5  # the loop kept serving while threads stepped and the model computed


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_cancelling_stops_all_work_and_empties_the_queue(chgnet_backend, how):
    """The consumer closes the iterator, or the task iterating it is cancelled (a gRPC client gone)."""
    async def cancel_early(served):
        seen, started = [], asyncio.Event()

        async def consume():
            events = run_workflow(RelaxOptions(fmax=1e-5, max_steps=10_000), silicon(10), served.evaluate,
                                  progress_interval_s=0.05)
            async with aclosing(events):
                async for event in events:
                    seen.append(event)
                    if isinstance(event, WorkflowProgress) and any(s.step >= 3 for s in event.structures):
                        started.set()
                        if how == "close":
                            return

        consumer = asyncio.create_task(consume())
        await started.wait()
        if how == "cancel":
            consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        requests = served.requests
        deadline = time.perf_counter() + 10
        while (abs(served.queue.queued_work) > 1e-6 or workflow_threads()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)  # the batch that was running finishes; the withdrawn ones go
        queued, threads = served.queue.queued_work, workflow_threads()
        batches = len(served.queue.history)
        await asyncio.sleep(0.5)
        return seen, requests, queued, threads, batches

    (seen, requests, queued, threads, batches), served = serve(chgnet_backend, cancel_early)
    assert not any(isinstance(e, StructureResult | StructureError | WorkflowSummary) for e in seen)
    assert queued == pytest.approx(0, abs=1e-6) and threads == []
    assert served.requests == requests and len(served.queue.history) == batches  # nothing submitted since


@pytest.mark.parametrize(("bad", "field", "message"), [
    (lambda s: _replace(s, positions=np.array([[np.nan, 0, 0], s.positions[1]])), "structures[4].positions[0]",
     "non-finite position"),
    # caught by the model's checks at the first evaluation, not up front
    (lambda s: _replace(s, numbers=np.array([14, 95])), "structures[4].atomic_numbers[1]", "not trained on Am"),
], ids=["non-finite-position", "unsupported-element"])
def test_a_malformed_structure_fails_alone(chgnet_backend, bad, field, message):
    structures = silicon(10)
    structures[4] = bad(structures[4])
    events, _ = serve(chgnet_backend, lambda s: collect(RelaxOptions(), structures, s.evaluate))
    (error,) = [e for e in events if isinstance(e, StructureError)]
    assert (error.index, error.field) == (4, field) and message in error.message
    assert "InvalidSystemError" in error.error_type or error.error_type == "UnsupportedElementError"
    done = {e.index for e in events if isinstance(e, StructureResult)}
    assert done == set(range(10)) - {4}
    assert (events[-1].succeeded, events[-1].failed) == (9, 1)


def test_a_full_queue_is_waited_out(chgnet_backend):
    """Past max_queued_work the queue answers ServerBusyError; the engine waits as told and resubmits."""
    structures = silicon(3)
    events, served = serve(chgnet_backend, lambda s: collect(RelaxOptions(), structures, s.evaluate),
                           BatchPolicy(budget=0, max_queued_work=1.0))
    assert len(results_by_index(events)) == 3
    assert served.requests > events[-1].evaluations  # some were refused first


def test_options_and_structures_the_workflow_cannot_take(chgnet_backend):
    with pytest.raises(InvalidSystemError, match=r"options.optimizer: unknown optimizer 'LBFGS'"):
        RelaxOptions(optimizer="LBFGS")
    molecule = System(numbers=np.array([8, 1, 1]), positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
                      cell=None, pbc=np.zeros(3, dtype=bool))
    events, served = serve(chgnet_backend, lambda s: collect(EOSOptions(), [molecule], s.evaluate))
    (error,) = [e for e in events if isinstance(e, StructureError)]
    assert error.field == "structures[0].pbc" and "periodic" in error.message and served.requests == 0

"""MLIPClient's workflows against the front door in this process (tiny MACE, no Ray): a drained
server's call is resumed elsewhere with only the unfinished structures, and a call that ends early
(deadline, an exception in on_event) leaves nothing behind on the server."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from ase.build import molecule
from frontdoor_harness import MACE_LOAD_WARNING, LoopThread, tiny_host

from mlipserve.config import ServerConfig
from mlipserve.server.frontdoor import FrontDoor
from mlipserve_client import MLIPClient
from mlipserve_client.errors import ServiceError
from mlipserve_client.workflow_types import (
    RelaxOptions,
    RelaxResult,
    StructureResult,
    WorkflowProgress,
    WorkflowSummary,
)

pytestmark = pytest.mark.filterwarnings(MACE_LOAD_WARNING)

MODEL = "mace-tiny"
ENDLESS = RelaxOptions(fmax=1e-9, max_steps=100_000)


def molecules(n: int):
    names = ["H2O", "CH4", "CO2", "CH3OH", "H2CO"]
    return [molecule(names[k % len(names)]) for k in range(n)]


@pytest.fixture(scope="module")
def loop_and_host():
    loop = LoopThread()
    host = tiny_host(loop)
    yield loop, host
    loop.run(host.aclose())
    loop.close()


def start(loop: LoopThread, host, port: int = 0) -> FrontDoor:
    door = FrontDoor(host, ServerConfig(port=port))
    loop.run(door.start())
    loop.run(door.refresh_health())
    return door


def workflow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("workflow-")]


def queue_is_empty(loop: LoopThread, host) -> bool:
    """Waits (up to 10 s) for the model's queue to hold no work and the workflow threads to end."""
    async def queued() -> float:
        return (await host._cached(MODEL)).queue.queued_work

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if abs(loop.run(queued())) < 1e-9 and not workflow_threads():
            return True
        time.sleep(0.05)
    return False


def test_a_drained_call_resumes_with_the_unfinished_structures_only(loop_and_host):
    loop, host = loop_and_host
    first = start(loop, host)
    first.workflows.max_in_flight = 2  # structures finish in rounds, so the drain finds some unfinished
    port, drained = first.port, threading.Event()
    events, results, resent, restarted = [], [], [], []

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, StructureResult):
            results.append(event.index)
            drained.set()

    def restart() -> None:
        drained.wait(60)
        loop.run(first.stop(grace=5))
        second = start(loop, host, port)  # the same address: the client reconnects to it
        checked = second.workflows._checked

        async def counting(rpc, raw, call):
            workflow = await checked(rpc, raw, call)
            resent.append((workflow.total, len(results)))
            return workflow

        second.workflows._checked = counting
        restarted.append(second)

    helper = threading.Thread(target=restart)
    helper.start()
    with MLIPClient(f"127.0.0.1:{port}", model=MODEL, timeout=120) as client:
        out = client.relax(molecules(6), RelaxOptions(fmax=1e-9, max_steps=40), on_event=on_event)
    helper.join(60)
    loop.run(restarted[0].stop(grace=1))
    assert all(isinstance(r, RelaxResult) and r.steps == 40 for r in out)
    ((total, done_before),) = resent
    assert 1 <= done_before < 6 and total == 6 - done_before
    assert sorted(results) == list(range(6))  # each structure's result once
    summary = events[-1]
    assert isinstance(summary, WorkflowSummary) and (summary.total, summary.succeeded) == (6, 6)
    progress = [e for e in events if isinstance(e, WorkflowProgress)]
    assert all(p.total == 6 for p in progress) and max(p.done for p in progress) >= done_before


@pytest.mark.parametrize("how", ["deadline", "on_event raises"])
def test_a_call_that_ends_early_leaves_nothing_on_the_server(loop_and_host, how):
    loop, host = loop_and_host
    door = start(loop, host)
    try:
        with MLIPClient(f"127.0.0.1:{door.port}", model=MODEL, timeout=60) as client:
            if how == "deadline":
                with pytest.raises(ServiceError) as error:
                    client.relax(molecules(4), ENDLESS, timeout=1.5)
                assert error.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                def stop(event) -> None:
                    if isinstance(event, WorkflowProgress) and any(s.step >= 3 for s in event.structures):
                        raise KeyboardInterrupt

                with pytest.raises(KeyboardInterrupt):
                    client.relax(molecules(4), ENDLESS, on_event=stop)
        assert queue_is_empty(loop, host)
    finally:
        loop.run(door.stop(grace=1))

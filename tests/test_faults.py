"""Faults under load: a model replica killed while 8 clients send 500 requests loses nothing.

Its own application on the session's Ray (two families of the tiny MACE model sharing one port),
so that the session server's replicas are not disturbed. A client connected to the killed replica
sees its connection drop and retries (UNAVAILABLE); a client connected to the other family's
replica is forwarded there by handle and its front door retries on the restarted replica."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from ase import Atoms
from frontdoor_harness import MACE_LOAD_WARNING, TINY_OPTIONS

from mlipserve_client import MLIPClient

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]

APP = "faults"
CLIENTS, PER_CLIENT = 8, 63  # 504 requests


def water(k: int) -> Atoms:
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.rattle(stdev=0.05, seed=k)
    return atoms


@pytest.fixture(scope="module")
def fault_app(server):
    from ray import serve

    from mlipserve import runtime
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig

    port = runtime.free_port()
    config = ServiceConfig(
        models=tuple(ModelConfig(id=f"tiny-{f}", backend="mace", family=f, options=TINY_OPTIONS,
                                 batching=BatchingConfig(budget=1e9, max_wait_ms=2)) for f in ("a", "b")),
        deployments={f: DeploymentConfig(num_cpus=0.25) for f in ("a", "b")},
        server=ServerConfig(port=port, peer_retry_s=90.0))
    runtime.deploy(config, name=APP)
    yield f"localhost:{port}"
    serve.delete(APP)


def _pid(family: str) -> int:
    from ray import serve

    from mlipserve.deployments.model import deployment_name

    return serve.get_deployment_handle(deployment_name(family), app_name=APP).front_door_pid.remote().result()


def test_killing_the_model_replica_under_load_loses_nothing(fault_app):
    with MLIPClient(fault_app, model="tiny-b", timeout=60) as reference_client:
        expected = [reference_client.compute(water(k))[0] for k in range(CLIENTS)]
    answered, wrong, lost = [], [], []
    started = threading.Barrier(CLIENTS + 1)

    def client(k: int) -> None:
        with MLIPClient(fault_app, model="tiny-b", timeout=120) as own:
            started.wait()
            for _ in range(PER_CLIENT):
                try:
                    (got,) = own.compute(water(k))
                except Exception as error:  # noqa: BLE001 - counted: a lost request
                    lost.append(repr(error))
                    continue
                ok = abs(got.energy - expected[k].energy) < 1e-9 and np.abs(got.forces - expected[k].forces).max() < 1e-9
                (answered if ok else wrong).append(k)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    started.wait()
    while len(answered) < 60:
        time.sleep(0.01)
    victim = _pid("b")
    os.kill(victim, signal.SIGKILL)
    killed_at = len(answered)
    for thread in threads:
        thread.join(timeout=300)
    print(f"\nreplica kill: {CLIENTS * PER_CLIENT} requests sent, {len(answered)} answered correctly "
          f"({killed_at} before the kill), {len(wrong)} wrong, {len(lost)} lost")
    assert not lost and not wrong
    assert len(answered) == CLIENTS * PER_CLIENT
    assert _pid("b") != victim  # Serve replaced the replica

"""More than one machine: a real two-node Ray cluster on this machine (`ray start` twice, the second
node on its own address, 127.0.0.2), `mlipserve serve --address` deploying onto it with a replica of
the model on each node and each replica's front door on its node's address.

Both front doors answer; 8 clients spreading their calls over both keep getting correct answers
while the worker node's raylet is killed (every request answered correctly, none lost, none
INTERNAL); the cluster is back to full strength when the node rejoins."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase import Atoms
from frontdoor_harness import TINY_OPTIONS
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlipserve.localcluster import local_cluster, serving
from mlipserve_client import MLIPClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER_IP = "127.0.0.2"
CLIENTS, PER_CLIENT = 8, 40


def water(k: int) -> Atoms:
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.rattle(0.05, seed=k)
    return atoms


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError:
            return False
    return status.status == health_pb2.HealthCheckResponse.SERVING


def _wait(condition, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {within_s} s"
        time.sleep(0.5)


def cluster_config(path: Path) -> Path:
    """The tiny MACE model, one replica per node, each front door on its node's address."""
    path.write_text(
        f"models:\n  - id: tiny\n    backend: mace\n    options: {dict(TINY_OPTIONS)!r}\n"
        "    batching: {budget: 0}\n"
        "deployments:\n  mace: {num_replicas: 2, max_replicas_per_node: 1, num_cpus: 0.5}\n"
        "server: {host: node}\n".replace("'", '"'))
    return path


def test_two_nodes_both_front_doors_serve_and_node_loss_loses_nothing(tmp_path):
    from mlipserve.runtime import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with local_cluster((WORKER_IP,)) as cluster, \
            serving(cluster, cluster_config(tmp_path / "cluster.yaml"), port, log) as serve:
        _wait(lambda: "serving gRPC at" in log.read_text() or serve.poll() is not None, 300, "deployed")
        assert serve.poll() is None, log.read_text()[-3000:]
        doors = [f"{cluster.head_ip()}:{port}", f"{WORKER_IP}:{port}"]
        _wait(lambda: all(_serving(d) for d in doors), 120, "serving on both nodes")
        expected = []
        for door in doors:  # each node's front door answers, with its node's replica
            with MLIPClient(door, model="tiny", timeout=60) as one:
                expected.append([one.compute(water(k))[0] for k in range(CLIENTS)])
        for a, b in zip(*expected, strict=True):
            assert a.energy == b.energy and np.array_equal(a.forces, b.forces)

        both = "ipv4:" + ",".join(doors)
        answered, wrong, lost = [], [], []

        def client(k: int) -> None:
            with MLIPClient(both, model="tiny", timeout=120) as own:
                for _ in range(PER_CLIENT):
                    try:
                        (got,) = own.compute(water(k))
                    except Exception as error:  # noqa: BLE001 - counted: a lost request
                        lost.append(repr(error))
                        continue
                    ok = got.energy == expected[0][k].energy and np.array_equal(got.forces, expected[0][k].forces)
                    (answered if ok else wrong).append(k)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for thread in threads:
            thread.start()
        _wait(lambda: len(answered) >= 60, 120, "60 answers")
        assert cluster.kill_worker(WORKER_IP)
        at_kill = len(answered)
        for thread in threads:
            thread.join(timeout=300)
        print(f"\nnode loss: {CLIENTS * PER_CLIENT} requests sent, {len(answered)} answered correctly "
              f"({at_kill} before the node was killed), {len(wrong)} wrong, {len(lost)} lost")
        assert not lost and not wrong and len(answered) == CLIENTS * PER_CLIENT
        assert not _serving(doors[1])

        cluster.add_worker(WORKER_IP)
        _wait(lambda: _serving(doors[1]), 240, "serving again on the rejoined node")
        with MLIPClient(doors[1], model="tiny", timeout=60) as rejoined:
            assert rejoined.compute(water(0))[0].energy == expected[0][0].energy

"""Shared fixtures: one real local Ray + Serve + gRPC proxy per test session, and local references.

Integration tests share one server (starting Ray and loading a model costs ~20 s); each test that
needs its own server starts it itself on a free port.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CHGNET_ID = "chgnet-0.3.0"


@dataclass
class RunningServer:
    address: str
    port: int
    # Health statuses observed by polling grpc.health.v1 while the application was deploying.
    startup_health: list[str] = field(default_factory=list)


def _poll_health(address: str, seen: list[str], done: threading.Event) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not done.is_set():
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))
            except grpc.RpcError as err:
                seen.append(err.code().name)
            if seen[-1] == "SERVING":
                return
            time.sleep(0.1)


@pytest.fixture(scope="session")
def server() -> RunningServer:
    """Real Ray Serve application serving CHGNet 0.3.0 over gRPC on a free loopback port."""
    from mlipserve import runtime
    from mlipserve.config import DeploymentConfig, ModelConfig, ServiceConfig

    config = ServiceConfig(
        models=(ModelConfig(id=CHGNET_ID, backend="chgnet", options={"version": "0.3.0"}),),
        deployments={"chgnet": DeploymentConfig(num_cpus=1)},
    )
    port = runtime.free_port()
    runtime.start_ray(num_cpus=2)
    runtime.start_serve(grpc_port=port)
    running = RunningServer(address=f"localhost:{port}", port=port)
    done = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(running.address, running.startup_health, done), daemon=True)
    poller.start()
    try:
        runtime.deploy(config)
        poller.join(timeout=60)
        yield running
    finally:
        done.set()
        runtime.stop_local()


@pytest.fixture(scope="session")
def chgnet_model():
    """The same pretrained CHGNet the server loads, for CHGNet's own ASE calculator."""
    from chgnet.model import CHGNet

    return CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)


@pytest.fixture()
def chgnet_calc(chgnet_model):
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(model=chgnet_model, use_device="cpu", return_site_energies=True)


@pytest.fixture(scope="session")
def client(server):
    from mlipserve_client import MLIPClient

    with MLIPClient(server.address, model=CHGNET_ID, timeout=120) as c:
        yield c


# --- structures ------------------------------------------------------------------------------------


def si_diamond() -> Atoms:
    """Si diamond, conventional cell 2x2x2 (64 atoms), slightly rattled so forces are non-zero."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(stdev=0.03, seed=1)
    return atoms


def nacl_rattled() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 1, 1)
    atoms.rattle(stdev=0.08, seed=2)
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)  # strained: non-zero stress
    return atoms


def ethanol_boxed() -> Atoms:
    """Isolated ethanol, no PBC, in a box (CHGNet's own calculator needs a cell)."""
    atoms = molecule("CH3CH2OH")
    atoms.center(vacuum=8.0)
    atoms.pbc = False
    return atoms


def ethanol_no_cell() -> Atoms:
    return molecule("CH3CH2OH")


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    return np.random.default_rng(20261129)

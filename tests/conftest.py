"""Shared fixtures: one real local Ray + Serve application per test session, and local references.

Integration tests share one server (starting Ray and loading a model costs ~20 s); each test that
needs its own server starts it itself on a free port.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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


FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _mace(stem: str, dtype: str = "float64", route: str = "state_dict") -> dict:
    path = FIXTURES / "mace" / stem
    if route == "checkpoint":
        return {"checkpoint": f"{path}.model", "dtype": dtype}
    return {"state_dict": f"{path}.state_dict.pt", "config": f"{path}.config.json", "dtype": dtype}


def session_config(plugin_path: Path, port: int):
    """What the session server serves: every built-in backend family, a plugin, a composite model,
    a family small enough to make its LRU evict, and a checkpoint that cannot load."""
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig
    from mlipserve_client.types import Dispersion

    unmerged = BatchingConfig(budget=0)
    one_thread = DeploymentConfig(num_cpus=0.5)
    return ServiceConfig(
        models=(
            ModelConfig(id=CHGNET_ID, backend="chgnet", options={"version": "0.3.0"}),
            ModelConfig(id=f"{CHGNET_ID}+d3", backend="chgnet", options={"version": "0.3.0"}, batching=unmerged,
                        corrections=(Dispersion("pbe", "bj"),)),
            # Merging forced on (a budget without a probe) so that tests can see batches form.
            ModelConfig(id="mace-tiny", backend="mace", options=_mace("tiny_mace_untrained"),
                        batching=BatchingConfig(budget=1e9, max_wait_ms=100)),
            ModelConfig(id="mace-gst", backend="mace", options=_mace("mace_swa_GeSbTe"), batching=unmerged),
            ModelConfig(id="mace-broken", backend="mace", options={"checkpoint": "/nonexistent/broken.model"}),
            ModelConfig(id="lru-a", backend="mace", family="mace-lru", options=_mace("tiny_mace_untrained"),
                        batching=unmerged),
            ModelConfig(id="lru-b", backend="mace", family="mace-lru",
                        options=_mace("tiny_mace_untrained", route="checkpoint"), batching=unmerged),
            ModelConfig(id="sevennet-0", backend="sevennet", options={"checkpoint": "7net-0"}, batching=unmerged),
            ModelConfig(id="emt", backend="emt", batching=unmerged),
        ),
        deployments={
            "chgnet": one_thread,
            "mace": DeploymentConfig(num_cpus=0.5, max_models_per_replica=2),
            "mace-lru": DeploymentConfig(num_cpus=0.25, max_models_per_replica=1),
            "sevennet": one_thread,
            # A plugin installed where the replicas find it: here through the runtime_env.
            "emt": DeploymentConfig(num_cpus=0.25, runtime_env={"env_vars": {"PYTHONPATH": str(plugin_path)}}),
        },
        server=ServerConfig(port=port),
    )


@pytest.fixture(scope="session")
def emt_plugin(tmp_path_factory) -> Path:
    """The example plugin (examples/mlipserve-emt) pip-installed into a directory of its own."""
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("emt-plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLES / "mlipserve-emt")], check=True, timeout=300)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))


@pytest.fixture(scope="session")
def server(emt_plugin) -> RunningServer:
    """Real Ray Serve application serving session_config() over gRPC on a free loopback port: every
    family replica runs the front door on that port."""
    from mlipserve import runtime

    port = runtime.free_port()
    # Logical CPUs: five model replicas of 0.25-0.5 CPU each share this machine's two cores.
    runtime.start_ray(num_cpus=4)
    runtime.start_serve()
    running = RunningServer(address=f"localhost:{port}", port=port)
    done = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(running.address, running.startup_health, done), daemon=True)
    poller.start()
    try:
        runtime.deploy(session_config(emt_plugin, port))
        poller.join(timeout=60)
        yield running
    finally:
        done.set()
        runtime.stop_local()


def family_handle(family: str):
    """A handle to a family deployment of the session server, for introspection."""
    from ray import serve

    from mlipserve.deployments.model import deployment_name
    from mlipserve.runtime import APP_NAME

    return serve.get_deployment_handle(deployment_name(family), app_name=APP_NAME)


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

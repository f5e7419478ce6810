"""MD sessions through the real service (Ray Serve, front door in the model replicas): the same
trajectories as unary calls and the local calculator, one round trip per geometry under NPT, and
MD runs that survive a killed replica and a restarted service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from conftest import CHGNET_ID, FIXTURES
from frontdoor_harness import MACE_LOAD_WARNING, TINY_OPTIONS

from mlipserve.localcluster import terminate
from mlipserve_client import RemoteCalculator

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]


def si_hot() -> Atoms:
    """16 atoms of Si at 300 K: small, so that 200 steps through three calculators stay quick."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 1, 1)
    atoms.rattle(0.03, seed=11)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(11))
    return atoms


def gst() -> Atoms:
    """16 atoms of rocksalt GeTe at 600 K, for the fixture Ge-Sb-Te MACE model."""
    atoms = bulk("GeTe", "rocksalt", a=6.0, cubic=True) * (2, 1, 1)
    atoms.rattle(0.03, seed=12)
    thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(12))
    return atoms


def nve(atoms: Atoms, calc, steps: int, on_step=None) -> np.ndarray:
    """Forces of every geometry of a VelocityVerlet run."""
    atoms = atoms.copy()
    atoms.calc = calc
    forces = [atoms.get_forces().copy()]
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)

    def record():
        forces.append(atoms.get_forces().copy())
        if on_step:
            on_step(len(forces) - 1)

    dyn.attach(record, interval=1)
    dyn.run(steps)
    return np.array(forces)


class CountingCalculator:
    """Wraps a local calculator, counting the geometries it was asked to compute."""

    def __init__(self, calc) -> None:
        self.calc = calc
        self.calls = 0
        original = calc.calculate

        def calculate(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        calc.calculate = calculate


@pytest.mark.parametrize("model", [CHGNET_ID, "mace-gst"])
def test_200_nve_steps_through_a_session_equal_the_unary_path_and_the_local_run(server, model):
    """The fixture MACE model (float64) also against its own MACECalculator in this process."""
    atoms = si_hot() if model == CHGNET_ID else gst()
    session = RemoteCalculator(server.address, model, stream=True, timeout=120)
    unary = RemoteCalculator(server.address, model, stream=False, timeout=120)
    by_session = nve(atoms, session, 200)
    by_unary = nve(atoms, unary, 200)
    assert session._session is not None and session._session.opens == 1
    np.testing.assert_allclose(by_session, by_unary, atol=1e-6, rtol=0)
    assert session.round_trips == 201
    if model == "mace-gst":
        from mace.calculators import MACECalculator

        local = MACECalculator(model_paths=str(FIXTURES / "mace" / "mace_swa_GeSbTe.model"), device="cpu",
                               default_dtype="float64")
        np.testing.assert_allclose(by_session, nve(atoms, local, 200), atol=1e-6, rtol=0)
    session.close()
    unary.close()


@pytest.mark.parametrize("integrator", ["berendsen", "mtk"])
def test_npt_makes_one_round_trip_per_geometry_like_the_local_calculator(server, chgnet_calc, integrator):
    def run(calc) -> Atoms:
        atoms = si_hot()
        atoms.calc = calc
        if integrator == "berendsen":
            dyn = NPTBerendsen(atoms, timestep=1.0 * units.fs, temperature_K=300, pressure_au=1.0 * units.bar,
                               taut=100 * units.fs, taup=1000 * units.fs, compressibility_au=4.57e-5 / units.bar)
        else:
            dyn = IsotropicMTKNPT(atoms, timestep=1.0 * units.fs, temperature_K=300, pressure_au=1.0 * units.bar,
                                  tdamp=100 * units.fs, pdamp=1000 * units.fs)
        dyn.run(15)
        return atoms

    counting = CountingCalculator(chgnet_calc)
    local = run(counting.calc)
    remote = RemoteCalculator(server.address, CHGNET_ID, timeout=120)
    served = run(remote)
    assert remote.round_trips == counting.calls  # one per geometry, forces and stress together
    assert abs(served.get_volume() - local.get_volume()) < 1e-3 * local.get_volume()
    remote.close()


# --- faults during MD -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def md_app(server):
    """The tiny MACE model (float64) in an application of its own, so that its replica can be killed."""
    from ray import serve

    from mlipserve import runtime
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig

    port = runtime.free_port()
    config = ServiceConfig(models=(ModelConfig(id="tiny", backend="mace", options=TINY_OPTIONS,
                                               batching=BatchingConfig(budget=0)),),
                           deployments={"mace": DeploymentConfig(num_cpus=0.25)}, server=ServerConfig(port=port))
    runtime.deploy(config, name="md-faults")
    yield f"127.0.0.1:{port}"
    serve.delete("md-faults")


def water_box() -> Atoms:
    atoms = Atoms("OH2OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0],
                                       [3, 3, 3], [3.96, 3, 3], [2.76, 3.93, 3]], cell=[6.5, 6.5, 6.5], pbc=True)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(13))
    return atoms


def test_md_survives_the_killed_replica_of_its_session(md_app):
    from ray import serve

    from mlipserve.deployments.model import deployment_name

    undisturbed = nve(water_box(), RemoteCalculator(md_app, "tiny"), 80)
    handle = serve.get_deployment_handle(deployment_name("mace"), app_name="md-faults")
    victim = handle.front_door_pid.remote().result()
    calc = RemoteCalculator(md_app, "tiny", timeout=120)

    def kill_at(step: int) -> None:
        if step == 30:
            os.kill(victim, signal.SIGKILL)

    disturbed = nve(water_box(), calc, 80, on_step=kill_at)
    assert calc._session.opens >= 2  # it was reopened after the kill
    np.testing.assert_allclose(disturbed, undisturbed, atol=1e-10, rtol=0)
    assert handle.front_door_pid.remote().result() != victim
    calc.close()


@pytest.mark.slow
def test_md_survives_a_restart_of_the_whole_service(tmp_path):
    """`mlipserve serve` stopped (SIGTERM) and started again on the same port in the middle of an
    NVE run: the run finishes, and its trajectory equals an undisturbed one."""
    from mlipserve.runtime import free_port

    config = tmp_path / "tiny.yaml"
    config.write_text(f"models:\n  - id: tiny\n    backend: mace\n    options: {dict(TINY_OPTIONS)!r}\n"
                      f"deployments:\n  mace: {{num_cpus: 1}}\n".replace("'", '"'))
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    def start(name: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mlipserve.cli", "serve", "--config", str(config),
                                     "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp_path)
        processes.append(proc)  # torn down below even if the test fails while it starts
        deadline = time.monotonic() + 240
        while "serving gRPC at" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        return proc

    processes: list[subprocess.Popen] = []
    first = start("first")
    try:
        address = f"127.0.0.1:{port}"
        undisturbed = nve(water_box(), RemoteCalculator(address, "tiny"), 60)
        restarter = threading.Thread(target=start, args=("second",))

        def restart_at(step: int) -> None:
            if step == 20:
                first.send_signal(signal.SIGTERM)
                assert first.wait(timeout=120) == 0
                # The client's next step finds nothing listening, and keeps retrying meanwhile.
                restarter.start()

        calc = RemoteCalculator(address, "tiny", timeout=300)
        disturbed = nve(water_box(), calc, 60, on_step=restart_at)
        # The new server's front door may answer before its CLI says so: wait for it to have said.
        restarter.join(timeout=300)
        assert len(processes) == 2 and processes[1].poll() is None and calc._session.opens >= 2
        np.testing.assert_allclose(disturbed, undisturbed, atol=1e-10, rtol=0)
        calc.close()
    finally:
        for proc in processes:
            terminate(proc)

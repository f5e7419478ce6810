"""Shared pieces of the benchmarks: structures, MD timing, a local server, the i-PI socket peer."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def si64() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=7)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(7))
    return atoms


def small_systems(n: int, seed: int = 0) -> list[Atoms]:
    """MD systems of 8-64 atoms: Si, Cu, NaCl and Al cells, rattled and thermalized at 300 K."""
    templates = [
        lambda: bulk("Si", "diamond", a=5.43, cubic=True),  # 8
        lambda: bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 1),  # 16
        lambda: bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 1, 1),  # 16
        lambda: bulk("Al", "fcc", a=4.05, cubic=True) * (2, 2, 2),  # 32
        lambda: bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2),  # 64
    ]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = templates[k % len(templates)]()
        atoms.rattle(0.03, seed=int(rng.integers(1 << 30)))
        thermalize_momenta(atoms, temperature_K=300, rng=rng)
        out.append(atoms)
    return out


def md_step_times(atoms: Atoms, calc, steps: int) -> list[float]:
    """Wall time of each VelocityVerlet step (one force call each)."""
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    stamps = [time.perf_counter()]
    dyn.attach(lambda: stamps.append(time.perf_counter()), interval=1)
    dyn.run(steps)
    return np.diff(stamps[1:]).tolist()


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


@contextmanager
def local_server(config, num_cpus: int | None = None):
    """A local Ray + Serve application serving ``config`` (front door on a free loopback port);
    yields its address."""
    import dataclasses

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlipserve import runtime

    port = runtime.free_port()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, port=port))
    runtime.start_ray(num_cpus)
    try:
        runtime.start_serve()
        runtime.deploy(config)
        yield f"127.0.0.1:{port}"
    finally:
        runtime.stop_local()


def family_handle(family: str):
    from ray import serve

    from mlipserve.deployments.model import deployment_name
    from mlipserve.runtime import APP_NAME

    return serve.get_deployment_handle(deployment_name(family), app_name=APP_NAME)


def write_result(name: str, report: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 2)}


# --- the peer: ASE's SocketIOCalculator (i-PI protocol), one model process per client ------------


def _ipi_worker(socket_name: str, structure: str, model: str, threads: int, device: str) -> None:
    """Runs in its own process: the model behind an i-PI socket client."""
    import torch
    from ase.calculators.socketio import SocketClient
    from ase.io import read

    torch.set_num_threads(threads)
    atoms = read(structure)
    atoms.calc = local_calculator(model, device)
    SocketClient(unixsocket=socket_name).run(atoms)


def local_calculator(model: str, device: str = "cpu"):
    """The model package's own ASE calculator for a model id of the catalog."""
    if model.startswith("chgnet-"):
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=CHGNet.load(model_name=model.removeprefix("chgnet-"), verbose=False,
                                                  use_device=device), use_device=device)
    raise SystemExit(f"no local calculator for {model}")


@contextmanager
def ipi_peer(atoms: Atoms, model: str, name: str, threads: int = 1, device: str = "cpu"):
    """A SocketIOCalculator whose model runs in its own process over a UNIX socket (the peer's best
    transport: ASE's TCP default adds ~88 ms per step from Nagle's algorithm)."""
    import subprocess
    import tempfile

    from ase.calculators.socketio import SocketIOCalculator
    from ase.io import write

    with tempfile.TemporaryDirectory() as tmp:
        structure = f"{tmp}/start.extxyz"
        write(structure, atoms)
        with SocketIOCalculator(unixsocket=name) as calc:
            worker = subprocess.Popen(
                [sys.executable, __file__, "ipi-worker", name, structure, model, str(threads), device],
                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            try:
                yield calc
            finally:
                calc.close()
                worker.wait(timeout=60)


if __name__ == "__main__" and sys.argv[1] == "ipi-worker":
    _ipi_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])

"""Remote vs local MD step time for one client, measured side by side in one run.

Starts a local server (Ray + Serve gRPC proxy + the model), then alternates blocks of VelocityVerlet
steps through RemoteCalculator, through the model package's own ASE calculator, and through the same
backend in-process (the same work as the server does), so that machine noise hits all three alike.
Writes results/md_step.json and results/md_step.png.

    python benchmarks/md_step.py [--model chgnet-0.3.0] [--rounds 6] [--steps 10] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

RESULTS = Path(__file__).resolve().parent / "results"


class InProcessBackend(Calculator):
    """The server's backend called directly: the same work per step as a served request."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from mlipserve.backends.base import Batch
        from mlipserve_client.convert import system_from_atoms
        from mlipserve_client.types import DEFAULT_PROPERTIES

        super().calculate(atoms, properties, system_changes)
        (result,) = self.backend.compute(Batch((system_from_atoms(self.atoms),), DEFAULT_PROPERTIES))
        self.results = result.as_ase_results()


def si64() -> object:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=7)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(7))
    return atoms


def step_times(atoms, calc, steps: int) -> list[float]:
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    stamps = []
    dyn.attach(lambda: stamps.append(time.perf_counter()), interval=1)
    dyn.run(steps)
    return np.diff(stamps).tolist()


def local_calculators(model_id: str):
    """(the package's own ASE calculator, the server's backend in-process) for ``model_id``."""
    from chgnet.model.dynamics import CHGNetCalculator

    from mlipserve.backends.chgnet import CHGNetBackend

    if not model_id.startswith("chgnet-"):
        raise SystemExit(f"no local reference for {model_id}")
    backend = CHGNetBackend(model_id=model_id, version=model_id.removeprefix("chgnet-"))
    return CHGNetCalculator(model=backend.model, use_device="cpu"), InProcessBackend(backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chgnet-0.3.0")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="MD steps per block")
    parser.add_argument("--num-cpus", type=int, default=2, help="torch threads, served and local")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    from mlipserve import runtime
    from mlipserve.config import DeploymentConfig, ModelConfig, ServiceConfig
    from mlipserve_client import RemoteCalculator

    torch.set_num_threads(args.num_cpus)
    config = ServiceConfig(models=(ModelConfig(id=args.model, backend="chgnet",
                                               options={"version": args.model.removeprefix("chgnet-")}),),
                           deployments={"chgnet": DeploymentConfig(num_cpus=args.num_cpus)})
    port = runtime.free_port()
    t0 = time.perf_counter()
    runtime.start_ray()
    runtime.start_serve(port)
    runtime.deploy(config)
    remote = RemoteCalculator(f"localhost:{port}", model=args.model)
    remote.get_potential_energy(si64())
    start_to_first_answer = time.perf_counter() - t0

    own, in_process = local_calculators(args.model)
    calculators = {"remote": remote, "local_package_calculator": own, "local_backend": in_process}
    times = {name: [] for name in calculators}
    try:
        for name, calc in calculators.items():  # warm-up
            step_times(si64(), calc, 3)
        for _ in range(args.rounds):
            for name, calc in calculators.items():
                times[name] += step_times(si64(), calc, args.steps)
    finally:
        runtime.stop_local()

    median = {name: float(np.median(t)) for name, t in times.items()}
    report = {
        "benchmark": "md_step",
        "model": args.model,
        "system": "Si diamond 2x2x2, 64 atoms, VelocityVerlet 1 fs",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.num_cpus}",
        "server_start_to_first_answer_s": round(start_to_first_answer, 2),
        "steps_per_calculator": len(times["remote"]),
        "median_step_ms": {k: round(v * 1e3, 2) for k, v in median.items()},
        "p99_step_ms": {k: round(float(np.percentile(t, 99)) * 1e3, 2) for k, t in times.items()},
        "ratio_remote_over_package_calculator": round(median["remote"] / median["local_package_calculator"], 3),
        "ratio_remote_over_backend_in_process": round(median["remote"] / median["local_backend"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "md_step.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(times, report, RESULTS / "md_step.png")
    print(json.dumps(report, indent=2))


def _plot(times: dict[str, list[float]], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(times)
    ax.boxplot([np.array(times[n]) * 1e3 for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [n.replace("_", "\n") for n in names])
    ax.set_ylabel("MD step (ms)")
    ax.set_title(f"{report['model']}, 64-atom Si: remote/local = {report['ratio_remote_over_package_calculator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

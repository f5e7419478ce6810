"""Remote vs local MD step time for one client, measured side by side in one run.

Starts a local server (Ray + Serve gRPC proxy + the model), then alternates blocks of VelocityVerlet
steps through RemoteCalculator, through the model package's own ASE calculator, and through the same
backend in-process (the same work as the server does), so that machine noise hits all three alike.
Also reports the resident memory of the model's replica and of this (local) process.
Writes results/md_step_<model>.json and .png.

    python benchmarks/md_step.py [--model chgnet-0.3.0|mace-mp-0-small-random|sevennet-0] [--rounds 6]
                                 [--steps 10] [--num-cpus 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from bench_common import RESULTS, local_server, machine, md_step_times, si64, write_result


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


def local_calculators(config, device: str):
    """(the package's own ASE calculator, the server's backend in-process) for a catalog model."""
    from mlipserve.backends import load_backend

    backend = load_backend(config, device)
    if config.backend == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=backend.model, use_device=device), InProcessBackend(backend)
    if config.backend == "mace":
        from mace.calculators import MACECalculator

        own = MACECalculator(models=[backend.model], device=device, default_dtype=backend.info.dtype)
        return own, InProcessBackend(backend)
    if config.backend == "sevennet":
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(config.options["checkpoint"], device=device), InProcessBackend(backend)
    raise SystemExit(f"no local reference calculator for backend {config.backend}")


def psutil_rss_mb() -> float:
    """Resident memory of this process, which holds the local calculators (and the client)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def replica_rss_mb(family: str) -> float:
    """Resident memory of the model family's Serve replica (Ray worker + torch + loaded models)."""
    import psutil

    name = f"ServeReplica:mlipserve:family:{family}"
    found = [p.memory_info().rss for p in psutil.process_iter(["cmdline"])
             if any(name in part for part in (p.info["cmdline"] or []))]
    return round(max(found) / 2**20, 1) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chgnet-0.3.0")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="MD steps per block")
    parser.add_argument("--num-cpus", type=int, default=2, help="torch threads, served and local")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, served and local")
    args = parser.parse_args()

    import torch

    from mlipserve.config import ServiceConfig
    from mlipserve_client import RemoteCalculator

    torch.set_num_threads(args.num_cpus)
    config = ServiceConfig.catalog().select([args.model])
    family = config.models[0].family_name
    config = dataclasses.replace(config, deployments={
        family: dataclasses.replace(config.deployment(family), num_cpus=args.num_cpus, device=args.device,
                                    num_gpus=1 if args.device.startswith("cuda") else 0)})
    t0 = time.perf_counter()
    with local_server(config) as address:
        remote = RemoteCalculator(address, model=args.model)
        remote.get_potential_energy(si64())
        start_to_first_answer = time.perf_counter() - t0
        own, in_process = local_calculators(config.models[0], args.device)
        calculators = {"remote": remote, "local_package_calculator": own, "local_backend": in_process}
        times: dict[str, list[float]] = {name: [] for name in calculators}
        for calc in calculators.values():  # warm-up
            md_step_times(si64(), calc, 3)
        for _ in range(args.rounds):
            for name, calc in calculators.items():
                times[name] += md_step_times(si64(), calc, args.steps)
        replica_mb = replica_rss_mb(family)
    local_mb = psutil_rss_mb()

    median = {name: float(np.median(t)) for name, t in times.items()}
    report = {
        "benchmark": "md_step",
        "model": args.model,
        "system": "Si diamond 2x2x2, 64 atoms, VelocityVerlet 1 fs",
        "machine": f"{machine()}, torch threads {args.num_cpus}, device {args.device}",
        "server_start_to_first_answer_s": round(start_to_first_answer, 2),
        "steps_per_calculator": len(times["remote"]),
        "median_step_ms": {k: round(v * 1e3, 2) for k, v in median.items()},
        "p99_step_ms": {k: round(float(np.percentile(t, 99)) * 1e3, 2) for k, t in times.items()},
        "replica_rss_mb": replica_mb,
        "local_process_rss_mb": local_mb,
        "ratio_remote_over_package_calculator": round(median["remote"] / median["local_package_calculator"], 3),
        "ratio_remote_over_backend_in_process": round(median["remote"] / median["local_backend"], 3),
    }
    write_result(f"md_step_{args.model}", report)
    _plot(times, report)
    print(json.dumps(report, indent=2))


def _plot(times: dict[str, list[float]], report: dict) -> None:
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
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / f"md_step_{report['model']}.png", dpi=120)


if __name__ == "__main__":
    main()

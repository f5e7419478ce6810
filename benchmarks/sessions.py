"""MD through the service at the speed of the model, side by side in one run (64-atom Si):

- a forces-then-stress step (what ASE's NPT integrators ask) with RemoteCalculator, against the
  model's in-process calculator: one round trip per geometry;
- NVE step overhead (served step minus the same backend in-process) on a session and on unary
  calls, next to a bare grpcio echo;
- the fraction of session steps that rebuild the neighbour list over ``--nve-steps`` NVE steps of
  300 K Si, and the model time the reuse saved (a fresh-list step against a reused-list step);
- 16 concurrent sessions of 8–16-atom systems against the in-process ceiling.

    python benchmarks/sessions.py [--models chgnet-0.3.0 mace-gst] [--steps 40] [--nve-steps 1000]

Writes results/sessions.json and results/sessions.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from bench_common import RESULTS, ROOT, family_handle, local_server, machine, write_result
from frontdoor import concurrent_atoms_per_s, echo_floor_ms, mixed_8_16

FIXTURE_MACE = ROOT / "tests" / "fixtures" / "mace" / "mace_swa_GeSbTe"


def si64(seed: int = 7) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(0.02, seed=seed)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    return atoms


def gst64() -> Atoms:
    """64 atoms of rocksalt GeTe (the fixture MACE model's elements)."""
    atoms = bulk("GeTe", "rocksalt", a=6.0, cubic=True) * (2, 2, 2)
    atoms.rattle(0.02, seed=8)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(8))
    return atoms


def structure(model: str) -> Atoms:
    return si64() if model.startswith("chgnet") else gst64()


def local_calculator(model: str):
    if model.startswith("chgnet"):
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=CHGNet.load(model_name="0.3.0", verbose=False, use_device="cpu"),
                                use_device="cpu")
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=f"{FIXTURE_MACE}.model", device="cpu", default_dtype="float64")


def step_ms(atoms: Atoms, calc, steps: int, with_stress: bool) -> float:
    """Median wall time of a VelocityVerlet step; ``with_stress`` asks the stress after the forces
    at every step, as an NPT integrator does."""
    atoms = atoms.copy()
    atoms.calc = calc
    stamps = []

    def after_step():
        if with_stress:
            atoms.get_stress()
        stamps.append(time.perf_counter())

    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(after_step, interval=1)
    dyn.run(steps + 3)
    return statistics.median(np.diff(stamps[3:])) * 1e3


def backend_step_ms(model: str, atoms: Atoms, steps: int, key: str | None = None) -> float:
    """The same backend the replica runs, in this process, one E+F+S evaluation per step; with
    ``key``, as a session's steps (its skin neighbour list reused while atoms move 0.001 Å a step)."""
    from mlipserve.backends import load_backend
    from mlipserve.backends.base import Batch
    from mlipserve.config import ServiceConfig
    from mlipserve_client.convert import system_from_atoms
    from mlipserve_client.types import Property

    config = ServiceConfig.catalog().model(model) if model.startswith("chgnet") else _mace_config()
    backend = load_backend(config, "cpu")
    properties = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})
    keys = (key,) if key else ()
    atoms = atoms.copy()
    times = []
    for step in range(steps + 3):
        atoms.positions += np.random.default_rng(step).normal(0, 0.001, atoms.positions.shape)
        batch = Batch((system_from_atoms(atoms),), properties, neighbour_keys=keys)
        start = time.perf_counter()
        backend.compute(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def _mace_config():
    from mlipserve.config import BatchingConfig, ModelConfig

    return ModelConfig(id="mace-gst", backend="mace", batching=BatchingConfig(budget=0),
                       options={"state_dict": f"{FIXTURE_MACE}.state_dict.pt",
                                "config": f"{FIXTURE_MACE}.config.json", "dtype": "float64"})


def sixteen_sessions(address: str, model: str, seconds: float) -> float:
    """16 clients, each stepping its own 8–16-atom system through a session (E, F, S)."""
    from mlipserve_client import MLIPClient

    @contextmanager
    def session(atoms: Atoms):
        with MLIPClient(address, model=model, timeout=300) as own, \
                own.session(atoms, ("energy", "forces", "stress")) as stepped:
            yield lambda: stepped.step(atoms.positions)

    return concurrent_atoms_per_s(mixed_8_16(16), session, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["chgnet-0.3.0", "mace-gst"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nve-steps", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import torch

    from frontdoor import in_process
    from mlipserve.config import DeploymentConfig, ServiceConfig
    from mlipserve_client import RemoteCalculator

    torch.set_num_threads(args.num_cpus)
    report = {"benchmark": "sessions", "machine": machine(), "torch_threads": args.num_cpus,
              "echo_floor_ms": echo_floor_ms(200), "models": {}}
    catalog = ServiceConfig.catalog()
    models = tuple(catalog.model(m) if m.startswith("chgnet") else _mace_config() for m in args.models)
    config = ServiceConfig(models=models, deployments={
        f: DeploymentConfig(num_cpus=args.num_cpus, max_ongoing_requests=512) for f in {m.family_name for m in models}})
    local = {m: (local_calculator(m), backend_step_ms(m, structure(m), args.steps)) for m in args.models}
    reused = {m: backend_step_ms(m, structure(m), args.steps, key="benchmark") for m in args.models}
    ceiling = in_process(args.num_cpus, 20)["ceiling_16_atoms_per_s"] if "chgnet-0.3.0" in args.models else None
    with local_server(config, num_cpus=max(2, args.num_cpus * len(config.families))) as address:
        for model in args.models:
            calc, backend_ms = local[model]
            row = {"backend_in_process_step_ms": backend_ms,
                   "backend_in_process_reused_list_step_ms": reused[model],
                   "model_time_saved_by_reuse_ms": backend_ms - reused[model],
                   "local_calculator_forces_then_stress_ms": step_ms(structure(model), calc, args.steps, True)}
            for name, stream in (("session", True), ("unary", False)):
                remote = RemoteCalculator(address, model, stream=stream, timeout=300)
                row[f"{name}_forces_then_stress_ms"] = step_ms(structure(model), remote, args.steps, True)
                row[f"{name}_round_trips_per_step"] = remote.round_trips / (args.steps + 4)
                row[f"{name}_nve_step_ms"] = step_ms(structure(model), remote, args.steps, False)
                # Against the same backend doing the same work: a session's steps reuse their list.
                row[f"{name}_overhead_ms"] = row[f"{name}_nve_step_ms"] - (reused[model] if stream else backend_ms)
                remote.close()
            row["ratio_forces_then_stress_over_local"] = (row["session_forces_then_stress_ms"]
                                                          / row["local_calculator_forces_then_stress_ms"])
            row.update(neighbour_reuse(address, model, args.nve_steps))
            report["models"][model] = row
            print(model, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        if ceiling:
            served = sixteen_sessions(address, "chgnet-0.3.0", args.seconds)
            report["sixteen_sessions"] = {"atoms_per_s": served, "in_process_ceiling_atoms_per_s": ceiling,
                                          "ratio": served / ceiling}
            print("16 sessions", report["sixteen_sessions"], flush=True)
    path = write_result("sessions", report)
    _plot(report)
    print(f"wrote {path}")


def neighbour_reuse(address: str, model: str, steps: int) -> dict:
    """NVE of 300 K Si (or GeTe) through a session; how often the replica rebuilt the session's list."""
    from mlipserve_client import RemoteCalculator

    family = "chgnet" if model.startswith("chgnet") else "mace"
    handle = family_handle(family)
    before = handle.neighbour_stats.remote(model).result()
    calc = RemoteCalculator(address, model, stream=True, timeout=300)
    atoms = structure(model)
    atoms.calc = calc
    VelocityVerlet(atoms, timestep=1.0 * units.fs).run(steps)
    after = handle.neighbour_stats.remote(model).result()
    calc.close()
    if after is None:
        return {"neighbour_lists": "not kept by this backend"}
    steps_served = after.total.steps - (before.total.steps if before else 0)
    rebuilds = after.total.rebuilds - (before.total.rebuilds if before else 0)
    return {"nve_steps": steps, "session_steps_seen": steps_served, "rebuilds": rebuilds,
            "rebuild_fraction": rebuilds / steps_served if steps_served else None}


def _plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(models))
    for offset, key, label in ((-0.3, "local_calculator_forces_then_stress_ms", "in-process calculator"),
                               (-0.1, "backend_in_process_step_ms", "backend in-process (E+F+S)"),
                               (0.1, "session_forces_then_stress_ms", "served, session"),
                               (0.3, "unary_forces_then_stress_ms", "served, unary")):
        ax.bar(x + offset, [report["models"][m][key] for m in models], 0.2, label=label)
    ax.set_xticks(x, models)
    ax.set_ylabel("ms per forces-then-stress MD step, 64 atoms")
    ax.legend(fontsize=7)
    for offset, key, label in ((-0.15, "session_overhead_ms", "session"), (0.15, "unary_overhead_ms", "unary")):
        bx.bar(x + offset, [report["models"][m][key] for m in models], 0.3, label=label)
    bx.axhline(report["echo_floor_ms"], color="k", ls="--", label="bare grpcio echo")
    bx.axhline(1.0, color="r", ls=":", label="goal for sessions (1 ms)")
    bx.set_xticks(x, models)
    bx.set_ylabel("NVE step overhead: served minus backend in-process (ms)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "sessions.png", dpi=120)


if __name__ == "__main__":
    main()

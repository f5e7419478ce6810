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


def alternating_md_ms(atoms: Atoms, first, second, steps: int, with_stress: bool) -> tuple[float, float]:
    """Median wall time of a VelocityVerlet step with each calculator, their steps alternating so
    that both see the same machine; ``with_stress`` asks the stress after the forces at every step,
    as an NPT integrator does."""
    runs = []
    for calc in (first, second):
        copy = atoms.copy()
        copy.calc = calc
        runs.append((copy, VelocityVerlet(copy, timestep=1.0 * units.fs), []))
    for step in range(steps + 3):
        for copy, dyn, times in runs:
            start = time.perf_counter()
            dyn.run(1)
            if with_stress:
                copy.get_stress()
            if step >= 3:
                times.append(time.perf_counter() - start)
    return tuple(statistics.median(times) * 1e3 for _, _, times in runs)


def load_backend_for(model: str):
    from mlipserve.backends import load_backend
    from mlipserve.config import ServiceConfig

    config = ServiceConfig.catalog().model(model) if model.startswith("chgnet") else _mace_config()
    return load_backend(config, "cpu")


def paired_overheads(address: str, model: str, backend, atoms: Atoms, steps: int) -> dict:
    """Served step minus the same backend's step in this process, call by call (alternating): on a
    session (whose steps reuse their neighbour list, as the local ones do under the same kind of
    key) and on unary calls (fresh lists on both sides)."""
    from mlipserve.backends.base import Batch
    from mlipserve_client import MLIPClient
    from mlipserve_client.convert import system_from_atoms
    from mlipserve_client.types import Property

    properties = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})
    atoms = atoms.copy()
    rng = np.random.default_rng(3)
    out = {}
    with MLIPClient(address, model=model, timeout=300) as client, client.session(atoms, properties) as session:
        for name, keys, serve in (("session", ("benchmark",), lambda: session.step(atoms.positions)),
                                  ("unary", (), lambda: client.compute(atoms, properties))):
            local, served = [], []
            for step in range(steps + 5):
                atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
                start = time.perf_counter()
                backend.compute(Batch((system_from_atoms(atoms),), properties, neighbour_keys=keys))
                middle = time.perf_counter()
                serve()
                if step >= 5:
                    local.append(middle - start)
                    served.append(time.perf_counter() - middle)
            out[f"{name}_step_ms"] = statistics.median(served) * 1e3
            out[f"{name}_local_step_ms"] = statistics.median(local) * 1e3
            out[f"{name}_overhead_ms"] = statistics.median(np.subtract(served, local)) * 1e3
    out["model_time_saved_by_reuse_ms"] = out["unary_local_step_ms"] - out["session_local_step_ms"]
    return out


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

    from frontdoor import InProcess
    from mlipserve.config import DeploymentConfig, ServiceConfig
    from mlipserve_client import RemoteCalculator

    report = {"benchmark": "sessions", "machine": machine(), "torch_threads": args.num_cpus,
              "echo_floor_ms": echo_floor_ms(200), "models": {}}
    catalog = ServiceConfig.catalog()
    models = tuple(catalog.model(m) if m.startswith("chgnet") else _mace_config() for m in args.models)
    config = ServiceConfig(models=models, deployments={
        f: DeploymentConfig(num_cpus=args.num_cpus, max_ongoing_requests=512) for f in {m.family_name for m in models}})
    chgnet = InProcess(args.num_cpus) if "chgnet-0.3.0" in args.models else None  # sets the torch threads
    with local_server(config, num_cpus=max(2, args.num_cpus * len(config.families))) as address:
        for model in args.models:
            backend = chgnet.backend if model.startswith("chgnet") and chgnet else load_backend_for(model)
            row = paired_overheads(address, model, backend, structure(model), args.steps)
            remote = RemoteCalculator(address, model, timeout=300)
            served_ms, local_ms = alternating_md_ms(structure(model), remote, local_calculator(model), args.steps, True)
            row.update(session_forces_then_stress_ms=served_ms, local_calculator_forces_then_stress_ms=local_ms,
                       round_trips_per_step=remote.round_trips / (args.steps + 4),
                       ratio_forces_then_stress_over_local=served_ms / local_ms)
            remote.close()
            row.update(neighbour_reuse(address, model, args.nve_steps))
            report["models"][model] = row
            print(model, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        if chgnet:
            served = sixteen_sessions(address, "chgnet-0.3.0", args.seconds)
            ceiling = chgnet.ceiling_atoms_per_s(mixed_8_16(16))
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
    for offset, key, label in ((-0.2, "local_calculator_forces_then_stress_ms", "in-process calculator"),
                               (0.2, "session_forces_then_stress_ms", "RemoteCalculator (session)")):
        ax.bar(x + offset, [report["models"][m][key] for m in models], 0.4, label=label)
    ax.set_xticks(x, models)
    ax.set_ylabel("ms per forces-then-stress MD step, 64 atoms")
    ax.legend(fontsize=7)
    for offset, key, label in ((-0.15, "session_overhead_ms", "session"), (0.15, "unary_overhead_ms", "unary")):
        bx.bar(x + offset, [report["models"][m][key] for m in models], 0.3, label=label)
    bx.axhline(report["echo_floor_ms"], color="k", ls="--", label="bare grpcio echo")
    bx.axhline(1.0, color="r", ls=":", label="goal for sessions (1 ms)")
    bx.set_xticks(x, models)
    bx.set_ylabel("step overhead: served minus backend in-process (ms)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "sessions.png", dpi=120)


if __name__ == "__main__":
    main()

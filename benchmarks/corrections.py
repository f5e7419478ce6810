"""Cost of the physics corrections (PME, Ewald, direct Coulomb, D3, QEq) against atom count, measured
side by side, and as a ratio to CHGNet's own energy + forces on the same 1,000-atom crystal.

Systems: rattled rocksalt NaCl supercells with ±1 e charges (for the direct sum: the same atoms as an
isolated cluster). Each size runs every correction once per round, in a rotating order, so machine
noise hits all alike; the median over rounds is reported. A correction is skipped at a size where it
is predicted (from its previous size and its scaling) to take longer than --budget-s per call or more
memory than --memory-gb, or where it refuses the system (QEq's dense solve: SystemTooLargeError).
Writes results/corrections.json and results/corrections.png.

    python benchmarks/corrections.py [--quick] [--rounds 3] [--threads 1] [--budget-s 60] [--memory-gb 6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Conventional 8-atom NaCl cells repeated: 96, 288, 1,000, 3,136 and 9,680 atoms.
SIZES = ((2, 2, 3), (3, 3, 4), (5, 5, 5), (7, 7, 8), (11, 11, 10))
QUICK_SIZES = SIZES[:3]
CHGNET_REPEAT = (5, 5, 5)
# How time grows with atoms, to predict the next size from the last: Ewald's k-space (balanced with
# its real space) and the direct sum are quadratic, the dense QEq solve cubic.
SCALING = {"pme": 1.2, "ewald": 2.0, "direct": 2.0, "d3(bj)-pbe": 1.0, "qeq": 3.0}
# D3's memory per pair within 40 bohr, energy + forces + stress (measured peak: 0.50 GB at 1,000
# atoms, 885k pairs; 1.18 GB at 2,744 atoms).
D3_BYTES_PER_PAIR = 600


def crystal(repeat: tuple[int, int, int], periodic: bool = True):
    from ase.build import bulk

    from mlipserve_client.types import System

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * repeat
    atoms.rattle(0.05, seed=1)
    charges = np.where(atoms.numbers == 11, 1.0, -1.0)
    return System(
        numbers=atoms.numbers.astype(np.int64),
        positions=atoms.positions.copy(),
        cell=atoms.cell.array.copy() if periodic else None,
        pbc=np.full(3, periodic),
        atomic_charges=charges,
    )


def corrections() -> dict[str, tuple[object, bool]]:
    """name -> (correction, periodic system?)."""
    from mlipserve.physics.dispersion import D3Dispersion
    from mlipserve.physics.electrostatics import Electrostatics
    from mlipserve.physics.qeq_corrections import QEqCorrection

    return {
        "pme": (Electrostatics(method="pme"), True),
        "ewald": (Electrostatics(method="ewald"), True),
        "direct": (Electrostatics(method="direct"), False),
        "d3(bj)-pbe": (D3Dispersion("pbe", "bj"), True),
        "qeq": (QEqCorrection(), True),
    }


def d3_pairs(system, cutoff: float) -> float:
    volume = abs(float(np.linalg.det(system.cell)))
    return system.n_atoms**2 / volume * (2.0 / 3.0) * math.pi * cutoff**3


def timed(correction, system) -> float:
    from mlipserve.backends.base import Batch
    from mlipserve_client.types import DEFAULT_PROPERTIES

    start = time.perf_counter()
    correction.compute(Batch((system,), DEFAULT_PROPERTIES))
    return time.perf_counter() - start


def chgnet_seconds(rounds: int) -> float:
    from mlipserve.backends.base import Batch
    from mlipserve.backends.chgnet import CHGNetBackend
    from mlipserve_client.types import DEFAULT_PROPERTIES

    backend = CHGNetBackend()
    batch = Batch((crystal(CHGNET_REPEAT),), DEFAULT_PROPERTIES)
    backend.compute(batch)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        backend.compute(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def skip_reason(name, correction, system, last, budget_s, memory_gb) -> str | None:
    if last is not None:
        n_last, t_last = last
        predicted = t_last * (system.n_atoms / n_last) ** SCALING[name]
        if predicted > budget_s:
            return f"predicted {predicted:.0f} s per call > budget {budget_s:g} s"
    if name.startswith("d3"):
        gigabytes = d3_pairs(system, correction.cutoff) * D3_BYTES_PER_PAIR / 1e9
        if gigabytes > memory_gb:
            pairs = d3_pairs(system, correction.cutoff)
            return f"predicted {gigabytes:.1f} GB > {memory_gb:g} GB ({pairs:.2e} pairs within 40 bohr)"
    return None


def sweep(sizes, rounds: int, budget_s: float, memory_gb: float) -> dict[str, list[dict]]:
    from mlipserve.errors import SystemTooLargeError

    table = corrections()
    rows: dict[str, list[dict]] = {name: [] for name in table}
    last: dict[str, tuple[int, float] | None] = {name: None for name in table}
    stopped: dict[str, str] = {}
    for repeat in sizes:
        systems = {True: crystal(repeat), False: crystal(repeat, periodic=False)}
        n = systems[True].n_atoms
        active = {}
        for name, (correction, periodic) in table.items():
            system = systems[periodic]
            reason = stopped.get(name) or skip_reason(name, correction, system, last[name], budget_s, memory_gb)
            if reason:
                stopped.setdefault(name, f"from {n} atoms: {reason}")
                rows[name].append({"n_atoms": n, "skipped": reason})
                continue
            try:
                first = timed(correction, systems[periodic])  # warm-up: parameters, first-call costs
            except SystemTooLargeError as err:
                stopped[name] = f"from {n} atoms: {err}"
                rows[name].append({"n_atoms": n, "skipped": str(err)})
                continue
            active[name] = [first] if first > 10.0 else []  # a slow first call counts as a round
        names = list(active)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order
                if len(active[name]) < rounds:
                    correction, periodic = table[name]
                    active[name].append(timed(correction, systems[periodic]))
        for name, times in active.items():
            median = float(np.median(times))
            row = {"n_atoms": n, "median_s": round(median, 4), "times_s": [round(t, 4) for t in times]}
            correction, periodic = table[name]
            if name in ("pme", "ewald"):
                chosen = vars(correction.parameters_for(systems[True]))
                row["parameters"] = {k: round(float(v), 4) for k, v in chosen.items()}
            rows[name].append(row)
            last[name] = (n, median)
            print(f"{name:>12} {n:>6} atoms  {median * 1e3:9.1f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 1,000 atoms, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per correction and size (3; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a replica's num_cpus; default 1)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="skip a call predicted to take longer")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="skip D3 predicted to need more")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = sweep(QUICK_SIZES if args.quick else SIZES, rounds, args.budget_s, args.memory_gb)
    chgnet = chgnet_seconds(rounds)
    print(f"{'chgnet-0.3.0':>12} {crystal(CHGNET_REPEAT).n_atoms:>6} atoms  {chgnet * 1e3:9.1f} ms", flush=True)
    at_1000 = {name: row["median_s"] for name, found in rows.items() for row in found
               if row["n_atoms"] == 1000 and "median_s" in row}
    report = {
        "benchmark": "corrections",
        "system": "rattled rocksalt NaCl supercells, ±1 e charges (direct: the same atoms, isolated); energy + forces",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch threads {args.threads}",
        "quick": args.quick,
        "rounds": rounds,
        "chgnet_1000_atoms_s": round(chgnet, 4),
        "ratio_to_chgnet_at_1000_atoms": {name: round(t / chgnet, 3) for name, t in at_1000.items()},
        "results": rows,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "corrections.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, chgnet, RESULTS / "corrections.png")
    summary = ("chgnet_1000_atoms_s", "ratio_to_chgnet_at_1000_atoms", "wall_s")
    print(json.dumps({k: report[k] for k in summary}, indent=2))


def _plot(rows: dict[str, list[dict]], chgnet: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, found in rows.items():
        measured = [r for r in found if "median_s" in r]
        if measured:
            ax.loglog([r["n_atoms"] for r in measured], [r["median_s"] for r in measured], "o-", label=name)
    ax.scatter([1000], [chgnet], marker="*", s=150, color="black", zorder=5, label="CHGNet E+F (1,000 atoms)")
    ax.set_xlabel("atoms")
    ax.set_ylabel("energy + forces (s)")
    ax.set_title("Correction cost, rocksalt NaCl, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

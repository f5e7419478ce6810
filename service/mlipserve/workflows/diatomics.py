"""Dimer energy curves in vacuum, all distances in one request, with MLIP Arena's checks
(atomind-ai/mlip-arena, homonuclear diatomics: rounding thresholds, flips, jumps, tortuosity,
conservation, Spearman coefficients on either side of the minimum)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii, vdw_alvarez
from scipy import stats

from mlipserve.errors import InvalidSystemError
from mlipserve.workflows.session import Session
from mlipserve_client.types import Property
from mlipserve_client.workflow_types import DiatomicChecks, DiatomicOptions, DiatomicResult, dimer

EF = frozenset({Property.ENERGY, Property.FORCES})
# MLIP Arena's far end where ASE has no van der Waals radius for the element.
DEFAULT_R_MAX = 6.0


def distances_for(numbers: tuple[int, int], options: DiatomicOptions) -> np.ndarray:
    if options.distances is not None:
        return np.sort(np.asarray(options.distances, dtype=np.float64))
    r_min = options.r_min_factor * float(np.mean(covalent_radii[list(numbers)]))
    vdw = [vdw_alvarez.vdw_radii[z] if z < len(vdw_alvarez.vdw_radii) else np.nan for z in numbers]
    r_max = options.r_max_factor * float(np.nanmax(vdw)) if not np.isnan(vdw).all() else DEFAULT_R_MAX
    return np.linspace(r_min, r_max, int((r_max - r_min) / options.step))


def _flips(values: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """The values that are not ~0, and where their sign flips between neighbours."""
    kept = values[np.abs(values) >= tolerance]
    return kept, np.diff(np.sign(kept)) != 0


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(y) == 0:
        return None  # undefined (scipy would warn)
    return float(stats.spearmanr(x, y).statistic)


def checks(distances: np.ndarray, energies: np.ndarray, forces: np.ndarray, options: DiatomicOptions) -> DiatomicChecks:
    # MLIP Arena's order: from the farthest distance in, energies relative to the farthest.
    r, e, f = distances[::-1], energies[::-1] - energies[-1], forces[::-1]
    lowest = int(np.argmin(e))
    _, force_flips = _flips(f, options.force_tolerance)
    steps, step_flips = _flips(np.diff(e), options.energy_tolerance)
    jump = np.abs(steps[:-1][step_flips]).sum() + np.abs(steps[1:][step_flips]).sum()
    variation = np.abs(np.diff(e)).sum()
    span = abs(e[0] - e.min()) + (e[-1] - e.min())
    return DiatomicChecks(
        equilibrium_distance=float(r[lowest]), well_depth=float(-e.min()), force_flips=int(force_flips.sum()),
        energy_diff_flips=int(step_flips.sum()), energy_jump=float(jump),
        tortuosity=float(variation / span) if span > 0 else float("nan"),
        conservation_deviation=float(np.mean(np.abs(f + np.gradient(e, r)))),
        spearman_repulsion=_spearman(r[lowest:], e[lowest:]), spearman_attraction=_spearman(r[:lowest], e[:lowest]))


def diatomic(atoms: Atoms, session: Session, options: DiatomicOptions) -> DiatomicResult:
    if len(atoms) != 2:
        raise InvalidSystemError("atomic_numbers", f"a diatomic curve needs 2 atoms, got {len(atoms)}")
    numbers = (int(atoms.numbers[0]), int(atoms.numbers[1]))
    distances = distances_for(numbers, options)
    session.report("diatomic", step=0)
    charge, spin = float(atoms.info.get("charge", 0.0)), int(atoms.info.get("spin", 0))
    results = session.evaluate([dimer(numbers, r, charge, spin) for r in distances], EF)
    session.evaluations_done()
    energies = np.array([res.energy for res in results])
    forces = np.array([res.forces[1, 0] for res in results])  # the bond lies along x, atom 1 at +r
    return DiatomicResult(numbers=numbers, distances=distances, energies=energies, forces=forces,
                          checks=checks(distances, energies, forces, options))

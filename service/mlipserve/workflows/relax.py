"""Relaxation with ASE's own optimizers and FrechetCellFilter, unchanged, on a served calculator."""

from __future__ import annotations

import dataclasses

from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixSymmetry
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE

from mlipserve.workflows.session import Session
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property
from mlipserve_client.workflow_types import RelaxOptions, RelaxResult

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS}


def relax_in_place(atoms: Atoms, session: Session, options: RelaxOptions, stage: str = "relax") -> tuple[int, bool]:
    """Relax ``atoms`` (positions, and the cell if ``options.relax_cell`` and it is fully periodic);
    returns (steps, converged). ``atoms.calc`` holds the final evaluation; no constraint remains."""
    atoms.calc = session.calculator()
    if options.fix_symmetry:
        atoms.set_constraint(FixSymmetry(atoms, symprec=options.symprec))
    target = (FrechetCellFilter(atoms, scalar_pressure=options.pressure_gpa * units.GPa)
              if options.relax_cell and atoms.pbc.all() else atoms)
    optimizer = OPTIMIZERS[options.optimizer](target, logfile=None)
    optimizer.attach(lambda: session.report(stage, step=optimizer.nsteps))
    session.report(stage, step=0)
    try:
        converged = optimizer.run(fmax=options.fmax, steps=options.max_steps)
    finally:
        # What follows (strains, displacements) must not be symmetrized back.
        atoms.set_constraint()
    return optimizer.nsteps, bool(converged)


def relax_result(atoms: Atoms, steps: int, converged: bool) -> RelaxResult:
    """The result of a relaxation, from the calculator's final (cached) evaluation."""
    forces = atoms.get_forces()
    periodic = bool(atoms.pbc.any())
    return RelaxResult(
        numbers=atoms.numbers.copy(),
        positions=atoms.positions.copy(),
        cell=atoms.cell.array.copy() if periodic or atoms.cell.rank == 3 else None,
        pbc=atoms.pbc.copy(),
        energy=float(atoms.get_potential_energy()),
        forces=forces,
        stress=atoms.get_stress() if periodic else None,
        steps=steps,
        converged=converged,
        max_force=float((forces**2).sum(axis=1).max() ** 0.5),
    )


def relax(atoms: Atoms, session: Session, options: RelaxOptions) -> RelaxResult:
    return relax_result(atoms, *relax_in_place(atoms, session, options))


def maybe_relax(atoms: Atoms, session: Session, options: RelaxOptions | None) -> RelaxResult | None:
    """The optional first stage of the other workflows."""
    return relax(atoms, session, options) if options is not None else None


def fixed_cell(options: RelaxOptions | None, wanted: bool) -> RelaxOptions | None:
    """The relaxation of each strained cell: positions only, otherwise as the workflow's own."""
    return dataclasses.replace(options or RelaxOptions(), relax_cell=False) if wanted else None


def evaluate_points(points: list[Atoms], session: Session, properties: frozenset[Property],
                    relax_options: RelaxOptions | None, stage: str) -> list[Atoms]:
    """Evaluate independent structures (strained cells, say), each left with its result on its
    calculator: all in one request, or with ``relax_options`` each relaxed concurrently, so that
    their steps still reach the queue together."""
    if relax_options is None:
        for atoms, result in zip(points, session.evaluate([system_from_atoms(a) for a in points], properties),
                                 strict=True):
            atoms.calc = SinglePointCalculator(atoms, **result.as_ase_results())
        return points
    session.map(lambda atoms: relax_in_place(atoms, session, relax_options, stage), points)
    return points

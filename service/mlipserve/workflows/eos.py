"""Equation of state: relax, scan volumes in one request, fit Birch–Murnaghan with ase.eos."""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.eos import EquationOfState

from mlipserve.workflows.relax import evaluate_points, fixed_cell, maybe_relax
from mlipserve.workflows.session import Session
from mlipserve_client.types import Property
from mlipserve_client.workflow_types import EOSOptions, EOSResult


def strained_copies(atoms: Atoms, strains: np.ndarray) -> list[Atoms]:
    copies = []
    for strain in strains:
        copy = atoms.copy()
        copy.set_cell(atoms.cell.array * (1 + strain), scale_atoms=True)
        copies.append(copy)
    return copies


def equation_of_state(atoms: Atoms, session: Session, options: EOSOptions) -> EOSResult:
    relaxed = maybe_relax(atoms, session, options.relax)
    session.report("eos", step=0)
    strains = np.linspace(-options.max_abs_strain, options.max_abs_strain, options.n_points)
    properties = frozenset({Property.ENERGY, Property.FORCES}) if options.relax_points else frozenset({Property.ENERGY})
    points = evaluate_points(strained_copies(atoms, strains), session, properties,
                             fixed_cell(options.relax, options.relax_points), "eos")
    session.evaluations_done()
    volumes = np.array([a.get_volume() for a in points])
    energies = np.array([a.get_potential_energy() for a in points])
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, e0, bulk_modulus = eos.fit(warn=False)  # reported as ``bracketed`` instead of a warning
    return EOSResult(v0=float(v0), e0=float(e0), b0_gpa=float(bulk_modulus / units.GPa),
                     b0_prime=float(eos.eos_parameters[2]), volumes=volumes, energies=energies,
                     bracketed=bool(volumes.min() < v0 < volumes.max()), relaxed=relaxed)

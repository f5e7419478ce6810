"""Elastic constants: relax, pymatgen's strain set evaluated in one request, pymatgen's fit and
Voigt–Reuss–Hill moduli (as matcalc does it)."""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.stress import voigt_6_to_full_3x3_stress
from pymatgen.analysis.elasticity import DeformedStructureSet, ElasticTensor, Strain, Stress
from pymatgen.io.ase import AseAtomsAdaptor

from mlipserve.workflows.relax import evaluate_points, fixed_cell, maybe_relax
from mlipserve.workflows.session import Session
from mlipserve_client.types import Property
from mlipserve_client.workflow_types import ElasticOptions, ElasticResult

STRESS = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})


def deformed_copies(atoms: Atoms, options: ElasticOptions) -> tuple[list[Atoms], list[Strain]]:
    """pymatgen's deformations applied to the ASE atoms themselves (rows of the cell map as
    ``cell @ F.T``, as Deformation.apply_to_structure does), so atom order and info are kept."""
    deformations = DeformedStructureSet(AseAtomsAdaptor.get_structure(atoms), options.norm_strains,
                                        options.shear_strains).deformations
    copies = []
    for deformation in deformations:
        copy = atoms.copy()
        copy.set_cell(atoms.cell.array @ np.asarray(deformation).T, scale_atoms=True)
        copies.append(copy)
    return copies, [Strain.from_deformation(d) for d in deformations]


def _stress_gpa(atoms: Atoms) -> Stress:
    return Stress(voigt_6_to_full_3x3_stress(atoms.get_stress()) / units.GPa)


def elastic(atoms: Atoms, session: Session, options: ElasticOptions) -> ElasticResult:
    relaxed = maybe_relax(atoms, session, options.relax)
    session.report("elastic", step=0)
    deformed, strains = deformed_copies(atoms, options)
    # The undeformed cell rides along: its residual stress is the fit's zero.
    reference, *points = evaluate_points([atoms.copy(), *deformed], session, STRESS,
                                         fixed_cell(options.relax, options.relax_deformed), "elastic")
    session.evaluations_done()
    tensor = ElasticTensor.from_independent_strains(strains, [_stress_gpa(a) for a in points],
                                                    eq_stress=_stress_gpa(reference))
    return ElasticResult(
        tensor_gpa=np.asarray(tensor.voigt), k_voigt_gpa=float(tensor.k_voigt), k_reuss_gpa=float(tensor.k_reuss),
        k_vrh_gpa=float(tensor.k_vrh), g_voigt_gpa=float(tensor.g_voigt), g_reuss_gpa=float(tensor.g_reuss),
        g_vrh_gpa=float(tensor.g_vrh), strains=np.array([s.voigt for s in strains]),
        stresses_gpa=np.array([a.get_stress() for a in points]) / units.GPa, relaxed=relaxed)

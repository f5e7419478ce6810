"""Harmonic phonons: relax, phonopy's displaced supercells in one request, phonopy for the rest
(Γ, a seekpath band path, DOS, thermal properties)."""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from phonopy import Phonopy
from phonopy.phonon.band_structure import get_band_qpoints_by_seekpath
from phonopy.structure.atoms import PhonopyAtoms
from phonopy.structure.cells import guess_primitive_matrix

from mlipserve.workflows.relax import maybe_relax
from mlipserve.workflows.session import Session
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property
from mlipserve_client.workflow_types import PhononOptions, PhononResult


def supercell_for(cell: np.ndarray, min_length: float) -> tuple[int, int, int]:
    """Repetitions that make every height of the supercell (the distance between opposite faces,
    which bounds the interactions a displacement sees) at least ``min_length``."""
    heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return tuple(max(1, math.ceil(min_length / h - 1e-9)) for h in heights)


def _phonopy_atoms(atoms: Atoms) -> PhonopyAtoms:
    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                        scaled_positions=atoms.get_scaled_positions())


def _ase_atoms(supercell: PhonopyAtoms, like: Atoms) -> Atoms:
    atoms = Atoms(supercell.symbols, cell=supercell.cell, scaled_positions=supercell.scaled_positions, pbc=True)
    atoms.info.update(like.info)  # total charge and spin of the cell, as phonopy does not carry them
    return atoms


def phonons(atoms: Atoms, session: Session, options: PhononOptions) -> PhononResult:
    relaxed = maybe_relax(atoms, session, options.relax)
    session.report("displacements", step=0)
    repetitions = options.supercell or supercell_for(atoms.cell.array, options.min_supercell_length)
    unitcell = _phonopy_atoms(atoms)
    # phonopy's "auto" primitive cell (the one seekpath's path is given in), resolved here because
    # phonopy 4 warns about its changed default when it resolves "auto" itself.
    phonon = Phonopy(unitcell, supercell_matrix=np.diag(repetitions), primitive_matrix=guess_primitive_matrix(unitcell))
    phonon.generate_displacements(distance=options.displacement)
    displaced = [_ase_atoms(s, atoms) for s in phonon.supercells_with_displacements]
    results = session.evaluate([system_from_atoms(a) for a in displaced], frozenset({Property.FORCES}))
    phonon.forces = [r.forces for r in results]
    session.evaluations_done()
    session.report("phonopy")
    phonon.produce_force_constants(show_drift=False)
    gamma = phonon.run_qpoints([[0.0, 0.0, 0.0]]).frequencies[0]
    qpoints, labels, connections = get_band_qpoints_by_seekpath(phonon.primitive, options.band_points,
                                                                is_const_interval=True)
    bands = phonon.run_band_structure(qpoints, path_connections=connections, labels=labels)
    phonon.run_mesh(list(options.mesh), is_gamma_center=True)  # a shifted mesh would break the symmetry
    dos = phonon.run_total_dos()
    # Γ's acoustic modes are zero up to numerical noise, which would enter the sums as spurious terms.
    thermal = phonon.run_thermal_properties(t_min=options.t_min, t_max=options.t_max, t_step=options.t_step,
                                            exclude_gamma_acoustic=True)
    return PhononResult(
        supercell=np.asarray(phonon.supercell_matrix), n_displacements=len(displaced), gamma_thz=np.array(gamma),
        band_labels=list(labels), band_connections=[bool(c) for c in connections],
        band_distances=[np.asarray(d) for d in bands.distances],
        band_frequencies_thz=[np.asarray(f) for f in bands.frequencies],
        dos_frequencies_thz=np.asarray(dos.frequency_points), dos=np.asarray(dos.dos),
        temperatures_k=np.asarray(thermal.temperatures), free_energy_kj_mol=np.asarray(thermal.free_energy),
        entropy_j_k_mol=np.asarray(thermal.entropy), heat_capacity_j_k_mol=np.asarray(thermal.heat_capacity),
        relaxed=relaxed)

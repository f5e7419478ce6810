"""Electrostatics correction in-process: Madelung constants (PME and Ewald), pymatgen's Ewald sum, a
plain double loop for clusters, finite-difference forces and stress, the neutralising background,
the exclusion radius, batching, and how charges are taken and checked."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.base import Correction
from mlipserve.physics.coulomb import COULOMB
from mlipserve.physics.qeq_corrections import Electrostatics
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property, System

ENERGY = frozenset({Property.ENERGY})
ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})


# --- helpers, also used by the QEq and D3 tests ---------------------------------------------------------


def system_of(atoms: Atoms, charges=None, total_charge: float | None = None) -> System:
    """A System of ``atoms`` with per-atom ``charges`` (if given) and a total charge (by default
    their sum, or 0)."""
    atoms = atoms.copy()
    if charges is not None:
        atoms.set_initial_charges(charges)
    if total_charge is None:
        total_charge = float(np.sum(charges)) if charges is not None else 0.0
    atoms.info["charge"] = total_charge
    return system_from_atoms(atoms)


def energy_of(correction, system: System) -> float:
    return correction.compute(Batch((system,), ENERGY))[0].energy


def finite_difference_forces(correction, system: System, atoms, h: float = 1e-4) -> np.ndarray:
    forces = np.zeros((len(atoms), 3))
    for k, atom in enumerate(atoms):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                positions = system.positions.copy()
                positions[atom, axis] += sign * h
                energies.append(energy_of(correction, dataclasses.replace(system, positions=positions)))
            forces[k, axis] = -(energies[0] - energies[1]) / (2 * h)
    return forces


def finite_difference_stress(correction, system: System, h: float = 1e-5) -> np.ndarray:
    """(1/V) dE/dε by a symmetric strain of cell and positions, Voigt order."""
    volume = abs(np.linalg.det(system.cell))
    stress = np.zeros(6)
    for k, (a, b) in enumerate(((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))):
        energies = []
        for sign in (1, -1):
            strain = np.zeros((3, 3))
            strain[a, b] += sign * h / (1 if a == b else 2)
            strain[b, a] = strain[a, b]
            deformation = np.eye(3) + strain
            energies.append(energy_of(correction, dataclasses.replace(
                system, positions=system.positions @ deformation, cell=system.cell @ deformation)))
        stress[k] = (energies[0] - energies[1]) / (2 * h) / volume
    return stress


def check_derivatives(correction, system: System, atoms=(0, 1), f_tol=1e-5, s_tol=1e-6) -> None:
    """Forces of ``atoms`` and stress against central differences (absolute tolerances, plus 1e-6
    relative for the FD truncation error of large forces)."""
    (result,) = correction.compute(Batch((system,), ALL))
    np.testing.assert_allclose(result.forces[list(atoms)], finite_difference_forces(correction, system, atoms),
                               atol=f_tol, rtol=1e-6)
    if system.cell is not None:
        np.testing.assert_allclose(result.stress, finite_difference_stress(correction, system), atol=s_tol, rtol=0)
    else:
        assert result.stress is None


# --- structures -------------------------------------------------------------------------------------------


def madelung_crystal(kind: str) -> tuple[Atoms, np.ndarray, float, float]:
    """(atoms, ±1 charges, nearest-neighbour distance, Madelung constant)."""
    if kind == "NaCl":
        atoms = bulk("NaCl", "rocksalt", a=2.0, cubic=True)
        return atoms, np.where(atoms.numbers == 11, 1.0, -1.0), 1.0, 1.747564594633
    if kind == "CsCl":
        atoms = bulk("CsCl", "cesiumchloride", a=1.0)
        return atoms, np.array([1.0, -1.0]), math.sqrt(3) / 2, 1.762674773070
    atoms = bulk("ZnS", "zincblende", a=1.0, cubic=True)
    return atoms, np.where(atoms.numbers == 30, 1.0, -1.0), math.sqrt(3) / 4, 1.638055053388


def random_periodic(n: int = 32, seed: int = 3) -> tuple[Atoms, np.ndarray]:
    """A triclinic cell of n atoms at least 1.2 Å apart with random charges summing to 0."""
    rng = np.random.default_rng(seed)
    cell = np.array([[8.013, 0.0, 0.0], [0.712, 7.504, 0.0], [-0.433, 0.281, 8.262]])
    positions = []
    while len(positions) < n:
        candidate = rng.uniform(0, 1, 3) @ cell
        atoms = Atoms("H" * (len(positions) + 1), positions=positions + [candidate], cell=cell, pbc=True)
        if len(positions) == 0 or atoms.get_distances(len(positions), range(len(positions)), mic=True).min() > 1.2:
            positions.append(candidate)
    charges = rng.uniform(-1.5, 1.5, n)
    charges -= charges.mean()
    numbers = np.where(charges > 0, 11, 17)
    return Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True), charges


def random_cluster(n: int = 12, seed: int = 4) -> tuple[Atoms, np.ndarray]:
    atoms, charges = random_periodic(n, seed)
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))  # no cell: no stress
    return atoms, charges


def coulomb_double_loop(positions: np.ndarray, charges: np.ndarray) -> tuple[float, np.ndarray]:
    energy, forces = 0.0, np.zeros_like(positions)
    for i in range(len(charges)):
        for j in range(len(charges)):
            if i != j:
                d = positions[i] - positions[j]
                r = np.linalg.norm(d)
                energy += 0.5 * COULOMB * charges[i] * charges[j] / r
                forces[i] += COULOMB * charges[i] * charges[j] * d / r**3
    return energy, forces


def pairs_within(atoms: Atoms, radius: float) -> list[tuple[int, int, float]]:
    """Every pair (i, j, r) closer than radius: i < j with any image, and i == j with one of each
    ±L pair of its own images."""
    periodic = atoms.pbc.any()
    reach = int(np.ceil(radius / min(np.linalg.norm(atoms.cell.array, axis=1)))) + 1 if periodic else 0
    found = []
    for i in range(len(atoms)):
        for j in range(i, len(atoms)):
            for image in itertools.product(range(-reach, reach + 1), repeat=3):
                nonzero = [n for n in image if n]
                if i == j and not (nonzero and nonzero[0] > 0):
                    continue
                r = np.linalg.norm(atoms.positions[j] + np.array(image) @ atoms.cell.array - atoms.positions[i])
                if r < radius:
                    found.append((i, j, r))
    return found


# --- tests -----------------------------------------------------------------------------------------------


def test_is_a_correction():
    correction = Electrostatics()
    assert isinstance(correction, Correction)
    assert correction.name == "coulomb" and Electrostatics(charges="qeq").name == "coulomb(qeq)"


@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize("kind", ["NaCl", "CsCl", "ZnS"])
def test_madelung_constants(method, kind):
    atoms, charges, distance, madelung = madelung_crystal(kind)
    energy = energy_of(Electrostatics(method=method), system_of(atoms, charges))
    # E = -M k q² / (2 d) per ion.
    found = -energy * 2 * distance / (COULOMB * len(atoms))
    assert found == pytest.approx(madelung, rel=1e-6)


def test_simple_cubic_lattice_in_background():
    """One charge per cubic cell in a neutralising background: E = -α k q² / (2L), α = 2.837297479
    (the Madelung constant of the simple-cubic Wigner crystal): checks the background term."""
    atoms = Atoms("Na", positions=[[0.3, 0.2, 0.1]], cell=np.eye(3) * 4.0, pbc=True)
    for method in ("ewald", "pme"):
        energy = energy_of(Electrostatics(method=method), system_of(atoms, [1.0]))
        assert energy == pytest.approx(-2.837297479 * COULOMB / (2 * 4.0), rel=1e-6)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_matches_pymatgen_ewald(method):
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import Lattice, Structure

    atoms, charges = random_periodic()
    structure = Structure(Lattice(atoms.cell.array), ["H"] * len(atoms), atoms.positions, coords_are_cartesian=True,
                          site_properties={"charge": charges})
    reference = EwaldSummation(structure, compute_forces=True, acc_factor=14.0)
    (result,) = Electrostatics(method=method).compute(Batch((system_of(atoms, charges),), ALL))
    assert result.energy == pytest.approx(reference.total_energy, rel=1e-6)
    np.testing.assert_allclose(result.forces, reference.forces, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.charges, charges)


def test_isolated_cluster_matches_double_loop():
    atoms, charges = random_cluster()
    (result,) = Electrostatics().compute(Batch((system_of(atoms, charges),), ALL))
    energy, forces = coulomb_double_loop(atoms.positions, charges)
    assert result.energy == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(result.forces, forces, atol=1e-10, rtol=0)
    assert result.stress is None


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_periodic_forces_and_stress_are_derivatives(method):
    atoms = bulk("NaCl", "rocksalt", a=5.642, cubic=True)
    atoms.rattle(0.1, seed=5)
    charges = np.where(atoms.numbers == 11, 0.8, -0.8)
    check_derivatives(Electrostatics(method=method), system_of(atoms, charges))


def test_isolated_forces_and_stress_are_derivatives():
    atoms, charges = random_cluster(8)
    check_derivatives(Electrostatics(exclusion_radius=3.0), system_of(atoms, charges))
    atoms.cell = np.diag([10.021, 11.032, 12.043])  # a cell without periodicity: stress over its volume
    check_derivatives(Electrostatics(), system_of(atoms, charges))


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_charged_cell_energy_per_atom_is_independent_of_the_cell(method):
    """Rocksalt with +1.1/-0.9 charges: the same crystal in its 2-atom and 8-atom cells."""
    per_atom = []
    for atoms in (bulk("NaCl", "rocksalt", a=5.64), bulk("NaCl", "rocksalt", a=5.64, cubic=True)):
        charges = np.where(atoms.numbers == 11, 1.1, -0.9)
        per_atom.append(energy_of(Electrostatics(method=method), system_of(atoms, charges)) / len(atoms))
    assert per_atom[0] == pytest.approx(per_atom[1], rel=1e-6)
    neutral = bulk("NaCl", "rocksalt", a=5.64)
    assert per_atom[0] != pytest.approx(energy_of(Electrostatics(), system_of(neutral, [1.0, -1.0])) / 2, rel=1e-3)


def test_charged_cell_energy_is_independent_of_the_smearing():
    """The background term -π σ² k Q²/V is what makes a charged cell's Ewald energy independent of
    the (unphysical) smearing σ."""
    import torch

    from mlipserve.physics.coulomb import Geometry, periodic_potentials
    from mlipserve.physics.tuning import EwaldParameters, ewald_parameters

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.1, seed=9)
    system = system_of(atoms, np.where(atoms.numbers == 11, 1.1, -0.9))
    geometry = Geometry.of(system, forces=False, stress=False, device=torch.device("cpu"))
    q = torch.tensor(system.atomic_charges)[:, None]
    energies = []
    for scale in (0.7, 1.0, 1.4):
        params = ewald_parameters(system.cell, system.n_atoms, 1e-9)
        params = EwaldParameters(params.smearing * scale, params.lr_wavelength * scale, params.cutoff * scale)
        energies.append(float((q * periodic_potentials(q, system, geometry, params)).sum()))
    assert energies[0] == pytest.approx(energies[1], rel=1e-8) and energies[2] == pytest.approx(energies[1], rel=1e-8)


@pytest.mark.parametrize("shape", ["cluster", "conventional", "primitive"])
@pytest.mark.parametrize("width", [0.0, 1.0])
def test_exclusion_radius_removes_close_pairs(shape, width):
    """The primitive cell (|a| = 3.99 Å) puts atoms' own images inside the radius."""
    radius = 4.5
    if shape == "cluster":
        atoms, charges = random_cluster()
    else:
        atoms = bulk("NaCl", "rocksalt", a=5.642, cubic=shape == "conventional")
        atoms.rattle(0.1, seed=6)
        charges = np.where(atoms.numbers == 11, 0.9, -0.9)
    system = system_of(atoms, charges)
    full = energy_of(Electrostatics(), system)
    excluded = energy_of(Electrostatics(exclusion_radius=radius, exclusion_width=width), system)
    removed = 0.0
    for i, j, r in pairs_within(atoms, radius):
        weight = 1.0 if r < radius - width else 0.5 * (1 + math.cos(math.pi * (r - radius + width) / width))
        removed += COULOMB * charges[i] * charges[j] * weight / r
    assert excluded == pytest.approx(full - removed, rel=1e-7, abs=1e-6)


def test_exclusion_keeps_forces_consistent():
    atoms = bulk("NaCl", "rocksalt", a=5.642, cubic=True)
    atoms.rattle(0.1, seed=7)
    check_derivatives(Electrostatics(exclusion_radius=6.0), system_of(atoms, np.where(atoms.numbers == 11, 1.0, -1.0)))


def test_batch_equals_one_by_one():
    crystal = bulk("NaCl", "rocksalt", a=5.642, cubic=True) * (2, 2, 2)  # 64 atoms: PME below
    crystal.rattle(0.05, seed=8)
    small = bulk("NaCl", "rocksalt", a=5.642, cubic=True)
    cluster, cluster_charges = random_cluster(7)
    other_cluster, other_charges = random_cluster(4, seed=9)
    systems = (
        system_of(crystal, np.where(crystal.numbers == 11, 1.0, -1.0)),
        system_of(cluster, cluster_charges),
        system_of(small, np.where(small.numbers == 11, 1.2, -0.8)),
        system_of(other_cluster, other_charges),
    )
    correction = Electrostatics(ewald_max_atoms=50, exclusion_radius=3.0)
    assert_batch_equals_one_by_one(correction, systems, f_tol=1e-10, s_tol=1e-12)


def assert_batch_equals_one_by_one(correction, systems, f_tol: float, s_tol: float) -> None:
    """Each system's result in one merged call equals its result alone (no stress without a cell)."""
    merged = correction.compute(Batch(systems, ALL))
    for system, result in zip(systems, merged, strict=True):
        (alone,) = correction.compute(Batch((system,), ALL))
        assert result.energy == pytest.approx(alone.energy, rel=1e-12)
        np.testing.assert_allclose(result.forces, alone.forces, atol=f_tol)
        if system.cell is None:
            assert result.stress is None
        else:
            np.testing.assert_allclose(result.stress, alone.stress, atol=s_tol)


def test_lone_atom():
    atoms = Atoms("Na", positions=[[0.0, 0.0, 0.0]])
    (result,) = Electrostatics().compute(Batch((system_of(atoms, [1.0]),), ALL))
    assert result.energy == 0.0 and not result.forces.any() and result.stress is None


def test_only_requested_properties():
    atoms, charges = random_periodic(8)
    energy_and_forces = frozenset({Property.ENERGY, Property.FORCES})
    (result,) = Electrostatics().compute(Batch((system_of(atoms, charges),), energy_and_forces))
    assert result.forces.shape == (8, 3) and result.stress is None
    (result,) = Electrostatics().compute(Batch((system_of(atoms, charges),), ENERGY))
    assert result.forces is None and result.stress is None


def test_request_charges_are_checked():
    atoms, charges = random_cluster(5)
    with pytest.raises(InvalidSystemError) as error:
        Electrostatics().compute(Batch((system_of(atoms, charges), system_of(atoms)), ENERGY))
    assert error.value.field == "systems[1].atomic_charges"
    with pytest.raises(InvalidSystemError, match="sum to 0.5") as error:
        Electrostatics().compute(Batch((system_of(atoms, charges + 0.1, total_charge=0.0),), ENERGY))
    assert error.value.field == "systems[0].atomic_charges"


def test_model_charges_are_used():
    atoms, charges = random_cluster(6)
    system = system_of(atoms)
    (result,) = Electrostatics(charges="model").compute(Batch((system,), ENERGY), model_charges=[charges])
    assert result.energy == pytest.approx(coulomb_double_loop(atoms.positions, charges)[0], rel=1e-12)
    np.testing.assert_array_equal(result.charges, charges)
    with pytest.raises(ValueError, match=r"systems\[0\]"):
        Electrostatics(charges="model").compute(Batch((system,), ENERGY), model_charges=[None])


def test_slabs_and_direct_periodic_are_rejected():
    slab = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab.pbc = (True, True, False)
    cluster, charges = random_cluster(4)
    batch = Batch((system_of(cluster, charges), system_of(slab, np.where(slab.numbers == 11, 1.0, -1.0))), ENERGY)
    with pytest.raises(ValueError, match="periodic along a, b only") as error:
        Electrostatics().compute(batch)
    assert error.value.field == "systems[1].pbc"
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    with pytest.raises(ValueError, match="'direct'"):
        Electrostatics(method="direct").compute(Batch((system_of(crystal, [1.0, -1.0]),), ENERGY))


def test_parameters_are_chosen_once_per_shape(monkeypatch):
    import torchpme.tuning

    def refuse(*args, **kwargs):
        raise AssertionError("torch-pme's tuners must not run per request")

    monkeypatch.setattr(torchpme.tuning, "tune_pme", refuse)
    monkeypatch.setattr(torchpme.tuning, "tune_ewald", refuse)
    atoms, charges = random_periodic(8)
    correction = Electrostatics()
    for seed in range(3):
        atoms.rattle(0.01, seed=seed)
        energy_of(correction, system_of(atoms, charges))
    assert len(correction.parameters) == 1

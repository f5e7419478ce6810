"""QEq in-process: charge conservation, signs and symmetry of simple charges, the periodic matrix
against a direct Gaussian reciprocal sum, isolated vs large-box periodic, the differentiable
interaction against the matrix, and forces/stress (QEq's own energy, and Coulomb with QEq charges
including the charges' response) against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from test_physics_electrostatics import ALL, ENERGY, check_derivatives, system_of

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError, SystemTooLargeError
from mlipserve.physics.base import Correction
from mlipserve.physics.electrostatics import COULOMB, Electrostatics, Geometry
from mlipserve.physics.qeq import RAPPE_GODDARD, QEq, QEqCorrection

REQUIRED = "H Li Be B C N O F Na Mg Al Si P S Cl K Ca Ti Fe Cu Zn Ga Ge As Se Br Rb Sr Ag Sn Sb Te I Cs Ba Pt Au Pb"


def water() -> Atoms:
    return molecule("H2O")


def rattled_mgo() -> Atoms:
    atoms = bulk("MgO", "rocksalt", a=4.212, cubic=True)
    atoms.rattle(0.08, seed=11)
    return atoms


def test_parameters_cover_the_required_elements():
    from ase.data import atomic_numbers

    missing = [symbol for symbol in REQUIRED.split() if atomic_numbers[symbol] not in RAPPE_GODDARD]
    assert not missing
    assert RAPPE_GODDARD[8] == (8.741, 13.364) and RAPPE_GODDARD[1] == (4.528, 13.890)


@pytest.mark.parametrize("total_charge", [0.0, -1.0, 0.5])
def test_total_charge_is_conserved(total_charge):
    systems = [system_of(water(), total_charge=total_charge), system_of(rattled_mgo(), total_charge=total_charge)]
    for system, charges in zip(systems, QEq().charges(systems)):
        assert abs(charges.sum() - total_charge) < 1e-10


def test_water_charges():
    (charges,) = QEq().charges([system_of(water())])
    oxygen, h1, h2 = charges
    assert oxygen < 0 < h1
    assert h1 == pytest.approx(h2, abs=1e-12)


def test_rocksalt_charges():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    (charges,) = QEq().charges([system_of(atoms)])
    sodium, chlorine = charges[atoms.numbers == 11], charges[atoms.numbers == 17]
    assert (sodium > 0).all() and (chlorine < 0).all()
    np.testing.assert_allclose(sodium, sodium[0], atol=1e-10)
    np.testing.assert_allclose(chlorine, chlorine[0], atol=1e-10)


def test_unsupported_element_is_named():
    atoms = Atoms("OHHe", positions=[[0, 0, 0], [0.96, 0, 0], [3, 0, 0]])
    with pytest.raises(InvalidSystemError, match="He") as error:
        QEq().charges([system_of(water()), system_of(atoms)])
    assert error.value.field == "systems[1].atomic_numbers[2]"


def test_too_large_systems_are_refused():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    with pytest.raises(SystemTooLargeError, match="8 atoms is more than its limit of 4") as error:
        QEq(max_atoms=4).charges([system_of(atoms)])
    assert error.value.field == "systems[0]" and error.value.n_atoms == 8


def test_periodic_matrix_is_the_gaussian_coulomb_matrix():
    """H_ij = (4πk/V) Σ_{k≠0} exp(-k²(σ_i²+σ_j²)/2) cos(k·r_ij)/k², by a direct reciprocal sum."""
    atoms = rattled_mgo()[:4]
    atoms.numbers[[1, 3]] = [8, 1]
    system = system_of(atoms)
    qeq = QEq(accuracy=1e-8)
    matrix = qeq.matrix(system).numpy()
    sigma = qeq.species(system, 0).sigma.numpy()
    reciprocal = 2 * np.pi * np.linalg.inv(atoms.cell.array).T
    span = 12
    n = np.array(np.meshgrid(*[np.arange(-span, span + 1)] * 3, indexing="ij")).reshape(3, -1).T
    k = n[np.any(n != 0, axis=1)] @ reciprocal
    k2 = (k**2).sum(axis=1)
    phase = atoms.positions @ k.T
    volume = atoms.get_volume()
    expected = np.zeros_like(matrix)
    for i in range(len(atoms)):
        for j in range(len(atoms)):
            weights = np.exp(-k2 * (sigma[i] ** 2 + sigma[j] ** 2) / 2) / k2
            expected[i, j] = 4 * np.pi * COULOMB / volume * (weights * np.cos(phase[i] - phase[j])).sum()
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-6)


def test_isolated_and_large_box_agree():
    molecule_ = water()
    boxed = molecule_.copy()
    boxed.cell = np.eye(3) * 30.0
    boxed.pbc = True
    isolated, periodic = QEq().charges([system_of(molecule_), system_of(boxed)])
    np.testing.assert_allclose(isolated, periodic, atol=2e-3)


@pytest.mark.parametrize("make", [water, rattled_mgo])
def test_interaction_equals_the_matrix(make):
    """The differentiable xᵀ H(r) y (Ewald or PME) equals the dense matrix the charges come from."""
    system = system_of(make())
    qeq = QEq()
    matrix = qeq.matrix(system)
    rng = np.random.default_rng(12)
    x, y = (torch.tensor(rng.normal(size=system.n_atoms)) for _ in range(2))
    geometry = Geometry.of(system, forces=False, stress=False, device=torch.device("cpu"))
    found = float(qeq.interaction(system, geometry, x, y))
    assert found == pytest.approx(float(x @ matrix @ y), rel=1e-6, abs=1e-6)


def test_qeq_correction_is_a_correction():
    assert isinstance(QEqCorrection(), Correction) and QEqCorrection().name == "qeq"


@pytest.mark.parametrize("make", [water, rattled_mgo])
def test_qeq_energy_derivatives(make):
    check_derivatives(QEqCorrection(), system_of(make()), s_tol=1e-5)


@pytest.mark.parametrize("make", [water, rattled_mgo])
def test_coulomb_with_qeq_charges_includes_their_response(make):
    """Forces are dE/dr of E(q(r), r): with the charges' response through the adjoint QEq solve."""
    check_derivatives(Electrostatics(charges="qeq"), system_of(make()), s_tol=1e-5)


def test_qeq_batch_equals_one_by_one():
    atoms = water()
    atoms.positions[0] += 0.05
    systems = (system_of(rattled_mgo()), system_of(water()), system_of(atoms, total_charge=-1.0))
    for correction in (QEqCorrection(), Electrostatics(charges="qeq", exclusion_radius=2.0)):
        merged = correction.compute(Batch(systems, ALL))
        for system, result in zip(systems, merged, strict=True):
            (alone,) = correction.compute(Batch((system,), ALL))
            assert result.energy == pytest.approx(alone.energy, rel=1e-12)
            np.testing.assert_allclose(result.forces, alone.forces, atol=1e-10)
            np.testing.assert_allclose(result.charges, alone.charges, atol=1e-12)


def test_lone_ion_takes_the_total_charge():
    ion = system_of(Atoms("Na", positions=[[0.0, 0.0, 0.0]]), total_charge=1.0)
    (result,) = Electrostatics(charges="qeq").compute(Batch((ion,), ALL))
    assert result.charges.tolist() == [1.0] and result.energy == 0.0 and not result.forces.any()


def test_qeq_energy_of_a_distant_pair_is_analytic():
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 200.0]])
    (result,) = QEqCorrection().compute(Batch((system_of(atoms),), ENERGY))
    # Charge transfer costs J and gains Δχ: at 200 Å it still happens, Δχ² / (2 (J_Na + J_Cl - k/r)).
    chi_na, j_na = RAPPE_GODDARD[11]
    chi_cl, j_cl = RAPPE_GODDARD[17]
    expected = -((chi_cl - chi_na) ** 2) / (2 * (j_na + j_cl - 2 * COULOMB * math.erf(200 / _gamma(j_na, j_cl)) / 200))
    assert result.energy == pytest.approx(expected, rel=1e-9)


def _gamma(j_a: float, j_b: float) -> float:
    sigma_a, sigma_b = (COULOMB / (math.sqrt(math.pi) * j) for j in (j_a, j_b))
    return math.sqrt(2 * (sigma_a**2 + sigma_b**2))

"""CHGNet backend in-process (no Ray): equal to CHGNet's own ASE calculator, batched == one by one,
and its stress conversion checked against finite differences of its own energy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ethanol_boxed, ethanol_no_cell, nacl_rattled, si_diamond

from mlipserve.backends.base import Backend, Batch
from mlipserve.backends.chgnet import CHGNetBackend
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property

ALL = frozenset(Property) - {Property.CHARGES}
# float32 model: the tolerances.
E_TOL_PER_ATOM, F_TOL, S_TOL = 1e-5, 1e-4, 1e-5


@pytest.fixture(scope="module")
def backend() -> CHGNetBackend:
    return CHGNetBackend(model_id="chgnet-0.3.0", version="0.3.0")


def test_implements_backend_protocol(backend):
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.architecture, info.version, info.cutoff, info.dtype) == ("CHGNet", "0.3.0", 6.0, "float32")
    assert info.num_parameters == 412_525 and info.elements == tuple(range(1, 95))


@pytest.mark.parametrize("make", [si_diamond, nacl_rattled, ethanol_boxed])
def test_equals_chgnet_calculator(backend, chgnet_calc, make):
    atoms = make()
    (result,) = backend.compute(Batch((system_from_atoms(atoms),), ALL))
    atoms.calc = chgnet_calc
    n = len(atoms)
    assert abs(result.energy - atoms.get_potential_energy()) / n < E_TOL_PER_ATOM
    np.testing.assert_allclose(result.forces, atoms.get_forces(), atol=F_TOL, rtol=0)
    np.testing.assert_allclose(result.stress, atoms.get_stress(), atol=S_TOL, rtol=0)
    np.testing.assert_allclose(result.energies, atoms.get_potential_energies(), atol=E_TOL_PER_ATOM, rtol=0)
    assert result.energies.sum() == pytest.approx(result.energy, abs=1e-4)
    np.testing.assert_allclose(result.magmoms, atoms.get_magnetic_moments(), atol=1e-5, rtol=0)


def test_molecule_without_cell_equals_boxed(backend, chgnet_calc):
    (result,) = backend.compute(Batch((system_from_atoms(ethanol_no_cell()),), ALL))
    boxed = ethanol_boxed()
    boxed.calc = chgnet_calc
    assert abs(result.energy - boxed.get_potential_energy()) / len(boxed) < E_TOL_PER_ATOM
    np.testing.assert_allclose(result.forces, boxed.get_forces(), atol=F_TOL, rtol=0)
    assert result.stress is None  # no cell, no stress


def test_batch_equals_one_by_one(backend):
    systems = [system_from_atoms(make()) for make in (si_diamond, nacl_rattled, ethanol_no_cell, ethanol_boxed)]
    batched = backend.compute(Batch(tuple(systems), ALL))
    for system, merged in zip(systems, batched, strict=True):
        (alone,) = backend.compute(Batch((system,), ALL))
        assert merged.energy == pytest.approx(alone.energy, abs=1e-4)
        np.testing.assert_allclose(merged.forces, alone.forces, atol=F_TOL, rtol=0)
        if alone.stress is None:
            assert merged.stress is None
        else:
            np.testing.assert_allclose(merged.stress, alone.stress, atol=S_TOL, rtol=0)


def test_only_requested_properties(backend):
    (result,) = backend.compute(Batch((system_from_atoms(si_diamond()),), frozenset({Property.ENERGY})))
    assert result.energy is not None
    assert result.forces is None and result.stress is None and result.energies is None and result.magmoms is None


def test_stress_is_ase_sign_and_unit_by_finite_differences(backend):
    """σ = (1/V) ∂E/∂ε in eV/Å³: a compressed cell has negative diagonal stress in ASE's convention."""
    atoms = nacl_rattled()
    atoms.set_cell(atoms.cell * 0.97, scale_atoms=True)
    (result,) = backend.compute(Batch((system_from_atoms(atoms),), ALL))
    volume, h = atoms.get_volume(), 2e-3
    fd = np.zeros(6)
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (i, j) in enumerate(voigt):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            (r,) = backend.compute(Batch((system_from_atoms(strained),), frozenset({Property.ENERGY})))
            energies.append(r.energy)
        fd[k] = (energies[0] - energies[1]) / (2 * h) / volume
    assert (result.stress[:3] < 0).all()
    # float32 energies (~1e-5 eV noise) over 2h·V ≈ 1.4 Å³: ~1e-5 eV/Å³ of noise.
    np.testing.assert_allclose(result.stress, fd, atol=5e-4, rtol=0.02)


@pytest.mark.parametrize("kind", ["bulk", "slab", "molecule"])
def test_translations_by_whole_cells_change_nothing(backend, kind):
    """Atoms far outside their cell (unwrapped MD) get the answer of the wrapped structure."""
    from ase.build import bulk, fcc111, molecule

    base = {"bulk": bulk("Si", cubic=True), "slab": fcc111("Cu", (2, 2, 3), vacuum=5.0),
            "molecule": molecule("CH3CH2OH")}[kind]
    moved = base.copy()
    if kind == "bulk":
        moved.positions[3] += 200 * moved.cell[0] - 150 * moved.cell[2]
    elif kind == "slab":
        moved.positions[3] += 200 * moved.cell[1]
        moved.positions[:, 2] += 700.0
    else:
        moved.positions += 800.0
    (r0,), (r1,) = (backend.compute(Batch((system_from_atoms(a),), ALL)) for a in (base, moved))
    assert r1.energy == pytest.approx(r0.energy, abs=1e-4)
    np.testing.assert_allclose(r1.forces, r0.forces, atol=F_TOL, rtol=0)
    if r0.stress is not None:
        np.testing.assert_allclose(r1.stress, r0.stress, atol=S_TOL, rtol=0)

"""What every backend promises, checked the same way for each: the Backend protocol with its info
filled, finite results of the right shapes for a crystal, a slab and a molecule, batching that
changes nothing, invariance under lattice translations, forces and stress that are derivatives of
the energy, and exactly the requested properties.

The structures hold only H, C and O so that the tiny MACE fixture can take them too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from mlipserve.backends.base import Backend, Batch, check_request
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import ModelInfo, Property, Result

pytestmark = [
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations"),
]

FIXTURES = Path(os.environ.get("MLIPSERVE_FIXTURES", Path(__file__).resolve().parent / "fixtures"))
ALL = frozenset(Property)


# --- H/C/O structures ------------------------------------------------------------------------------


def hco_bulk() -> Atoms:
    """Methane and water in a small triclinic cell: a (dense) molecular crystal, 8 atoms."""
    atoms = molecule("CH4") + molecule("H2O")
    atoms.positions[5:] += [2.6, 2.4, 2.3]
    atoms.set_cell([[4.6, 0.0, 0.0], [0.3, 4.4, 0.0], [0.2, -0.25, 4.3]])
    atoms.pbc = True
    atoms.rattle(stdev=0.03, seed=7)
    return atoms


def hco_slab() -> Atoms:
    """A methane-water layer, periodic in x and y with vacuum along z, 8 atoms."""
    atoms = molecule("CH4") + molecule("H2O")
    atoms.positions[5:] += [2.5, 2.3, 0.6]
    atoms.positions += [1.0, 1.0, 6.0]
    atoms.set_cell([[4.8, 0.0, 0.0], [0.4, 4.6, 0.0], [0.0, 0.0, 14.0]])
    atoms.pbc = [True, True, False]
    atoms.rattle(stdev=0.03, seed=8)
    return atoms


def hco_molecule() -> Atoms:
    """Ethanol without a cell (the System gets cell=None)."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(stdev=0.02, seed=9)
    return atoms


STRUCTURES = {"bulk": hco_bulk, "slab": hco_slab, "molecule": hco_molecule}


# --- backends --------------------------------------------------------------------------------------


def _chgnet():
    from mlipserve.backends.chgnet import CHGNetBackend

    return CHGNetBackend(model_id="chgnet-0.3.0", version="0.3.0")


def _mace_tiny():
    from mlipserve.backends.mace import MACEBackend

    return MACEBackend(
        model_id="mace-tiny",
        dtype="float64",
        state_dict=str(FIXTURES / "mace/tiny_mace_untrained.state_dict.pt"),
        config=str(FIXTURES / "mace/tiny_mace_untrained.config.json"),
    )


def _sevennet():
    from mlipserve.backends.sevennet import SevenNetBackend

    return SevenNetBackend(model_id="sevennet-0", checkpoint="7net-0")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(_chgnet, id="chgnet"),
        pytest.param(_mace_tiny, id="mace-tiny-float64"),
        pytest.param(_sevennet, id="sevennet-0"),
    ],
)
def backend(request) -> Backend:
    return request.param()


@pytest.fixture(scope="module")
def tol(backend) -> dict[str, float]:
    """Tolerances by dtype: merged-vs-alone and moved-vs-wrapped agree to rounding; finite
    differences (central, step h) carry float32 energy noise of ~1e-6·|E| over 2h."""
    if backend.info.dtype == "float64":
        return {"e": 1e-9, "f": 1e-9, "s": 1e-10, "fd_h": 1e-3, "fd_f": 1e-6, "fd_s": 1e-7}
    return {"e": 1e-4, "f": 1e-4, "s": 1e-5, "fd_h": 4e-3, "fd_f": 5e-3, "fd_s": 2e-4}


def _compute(backend, atoms_list, properties=ALL) -> list[Result]:
    properties = frozenset(properties) & backend.info.properties
    return backend.compute(Batch(tuple(system_from_atoms(a) for a in atoms_list), properties))


# --- the checks ------------------------------------------------------------------------------------


def test_implements_protocol_with_info_filled(backend):
    assert isinstance(backend, Backend)
    info = backend.info
    assert isinstance(info, ModelInfo)
    assert info.architecture and info.version and info.training_data and info.license and info.device
    assert info.cutoff > 0
    assert len(info.elements) > 0 and all(isinstance(z, int) and 1 <= z <= 118 for z in info.elements)
    assert {1, 6, 8} <= set(info.elements)
    assert info.dtype in ("float32", "float64")
    assert isinstance(info.num_parameters, int) and info.num_parameters > 0
    assert isinstance(info.trained, bool)
    assert {Property.ENERGY, Property.FORCES} <= info.properties <= frozenset(Property)
    assert info.default_task in (info.tasks or ("",))


@pytest.mark.parametrize("kind", STRUCTURES)
def test_finite_results_with_right_shapes(backend, kind):
    atoms = STRUCTURES[kind]()
    system = system_from_atoms(atoms)
    check_request(backend.info, [system], backend.info.properties)  # a valid request
    (result,) = _compute(backend, [atoms])
    n = len(atoms)
    assert np.isfinite(result.energy)
    assert result.forces.shape == (n, 3) and np.isfinite(result.forces).all()
    if Property.ENERGIES in backend.info.properties:
        assert result.energies.shape == (n,) and np.isfinite(result.energies).all()
        assert result.energies.sum() == pytest.approx(result.energy, abs=1e-4 + 1e-6 * abs(result.energy))
    if Property.STRESS in backend.info.properties:
        if system.cell is None:
            assert result.stress is None  # no cell, no stress
        else:
            assert result.stress.shape == (6,) and np.isfinite(result.stress).all()


def test_mixed_batch_equals_one_by_one(backend, tol):
    atoms_list = [hco_bulk(), hco_molecule(), hco_slab(), hco_bulk()]
    atoms_list[3].positions[0] += 0.1  # two systems of one shape must not be mixed up either
    merged = _compute(backend, atoms_list)
    for atoms, together in zip(atoms_list, merged, strict=True):
        (alone,) = _compute(backend, [atoms])
        assert together.energy == pytest.approx(alone.energy, abs=tol["e"] + 1e-7 * abs(alone.energy))
        np.testing.assert_allclose(together.forces, alone.forces, atol=tol["f"], rtol=0)
        if alone.stress is None:
            assert together.stress is None
        else:
            np.testing.assert_allclose(together.stress, alone.stress, atol=tol["s"], rtol=0)
    assert merged[0].energy != merged[3].energy


@pytest.mark.parametrize("kind", STRUCTURES)
def test_translation_by_whole_cells_changes_nothing(backend, tol, kind):
    """Unwrapped MD coordinates (atoms hundreds of cells away) give the wrapped structure's answer."""
    base = STRUCTURES[kind]()
    moved = base.copy()
    if kind == "bulk":
        moved.positions[3] += 200 * moved.cell[0] - 150 * moved.cell[2]
        moved.positions[6] -= 90 * moved.cell[1]
    elif kind == "slab":
        moved.positions[3] += 200 * moved.cell[1] - 70 * moved.cell[0]
        moved.positions[:, 2] += 700.0  # a rigid shift along the non-periodic axis
    else:
        moved.positions += 800.0
    r0, r1 = _compute(backend, [base, moved])
    assert r1.energy == pytest.approx(r0.energy, abs=tol["e"] + 1e-7 * abs(r0.energy))
    np.testing.assert_allclose(r1.forces, r0.forces, atol=tol["f"], rtol=0)
    if r0.stress is not None:
        np.testing.assert_allclose(r1.stress, r0.stress, atol=tol["s"], rtol=0)


def test_forces_are_minus_energy_gradient(backend, tol):
    """Central finite differences of the energy over every coordinate of a molecule, in one batch."""
    atoms = molecule("CH4")
    atoms.rattle(stdev=0.05, seed=10)
    h = tol["fd_h"]
    displaced = []
    for i in range(len(atoms)):
        for k in range(3):
            for sign in (1, -1):
                a = atoms.copy()
                a.positions[i, k] += sign * h
                displaced.append(a)
    energies = np.array([r.energy for r in _compute(backend, displaced, {Property.ENERGY})])
    fd = -(energies[0::2] - energies[1::2]).reshape(len(atoms), 3) / (2 * h)
    (result,) = _compute(backend, [atoms], {Property.FORCES})
    np.testing.assert_allclose(result.forces, fd, atol=tol["fd_f"], rtol=2e-3)
    assert np.abs(result.forces).max() > 20 * tol["fd_f"]  # the check has something to check


def test_stress_is_strain_derivative_of_energy(backend, tol):
    """σ = (1/V) ∂E/∂ε (ASE sign, eV/Å³) by central differences under symmetric strain."""
    if Property.STRESS not in backend.info.properties:
        pytest.skip("the backend offers no stress")
    atoms = hco_bulk()
    atoms.set_cell(atoms.cell * 0.95, scale_atoms=True)  # compressed: sizeable stress
    h = tol["fd_h"]
    strained = []
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for i, j in voigt:
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            strained.append(a)
    energies = np.array([r.energy for r in _compute(backend, strained, {Property.ENERGY})])
    fd = (energies[0::2] - energies[1::2]) / (2 * h) / atoms.get_volume()
    (result,) = _compute(backend, [atoms], {Property.STRESS})
    np.testing.assert_allclose(result.stress, fd, atol=tol["fd_s"], rtol=1e-3)
    assert np.abs(result.stress).max() > 20 * tol["fd_s"]


@pytest.mark.parametrize("wanted", [{Property.ENERGY}, {Property.FORCES}, {Property.STRESS}, {Property.ENERGIES}])
def test_only_requested_properties_come_back(backend, wanted):
    wanted = frozenset(wanted) & backend.info.properties
    if not wanted:
        pytest.skip("the backend offers none of these")
    (result,) = _compute(backend, [hco_bulk()], wanted)
    for p in Property:
        value = getattr(result, p.value)
        assert (value is not None) == (p in wanted), p


def test_no_stress_without_a_cell(backend):
    if Property.STRESS not in backend.info.properties:
        pytest.skip("the backend offers no stress")
    molecule_result, slab_result = _compute(backend, [hco_molecule(), hco_slab()], {Property.STRESS})
    assert molecule_result.stress is None
    assert slab_result.stress is not None

"""D3 dispersion in-process: against simple-dftd3 (zero and BJ damping, a molecule, crystals, a slab,
a shorter cutoff), its parameter table against s-dftd3's, finite-difference forces and stress,
batching, and input errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.units import Bohr, Hartree
from test_physics_electrostatics import ALL, assert_batch_equals_one_by_one, check_derivatives, system_of

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.base import Correction
from mlipserve.physics.d3_parameters import BJ, ZERO, damping_parameters
from mlipserve.physics.dispersion import D3Dispersion

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def rattled_nacl() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.642, cubic=True)
    atoms.rattle(0.05, seed=21)
    return atoms


def rattled_silicon() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.432)
    atoms.rattle(0.05, seed=22)
    return atoms


def small_slab() -> Atoms:
    atoms = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    atoms.pbc = (True, True, False)
    atoms.rattle(0.03, seed=23)
    return atoms


def simple_dftd3(atoms: Atoms, functional: str, damping: str, cutoff: float, cn_cutoff: float):
    """(energy, forces, stress) from s-dftd3 with the same two-body parameters and cutoffs."""
    from dftd3.interface import DispersionModel, RationalDampingParam, ZeroDampingParam

    periodic = atoms.pbc.any()
    model = DispersionModel(atoms.numbers, atoms.positions / Bohr, atoms.cell.array / Bohr if periodic else None,
                            np.array(atoms.pbc) if periodic else None)
    model.set_realspace_cutoff(cutoff / Bohr, cutoff / Bohr, cn_cutoff / Bohr)
    p = damping_parameters(functional, damping)
    if damping == "bj":
        param = RationalDampingParam(s6=p["s6"], s8=p["s18"], a1=p["rs6"], a2=p["rs18"], s9=0.0)
    else:
        param = ZeroDampingParam(s6=p["s6"], s8=p["s18"], rs6=p["rs6"], rs8=p["rs18"], s9=0.0)
    found = model.get_dispersion(param, grad=True)
    stress = None
    if periodic:
        virial = found["virial"] * Hartree / atoms.get_volume()
        stress = np.array([virial[a, b] for a, b in VOIGT])
    return float(found["energy"]) * Hartree, -found["gradient"] * Hartree / Bohr, stress


def test_is_a_correction():
    correction = D3Dispersion()
    assert isinstance(correction, Correction)
    assert correction.name == "d3(bj)-pbe" and D3Dispersion("PBE0", "zero").name == "d3(zero)-pbe0"


def test_parameters_are_s_dftd3s():
    import dftd3

    # dftd3.parameters needs a TOML package we do not install; the table ships next to it.
    with open(Path(dftd3.__file__).parent / "parameters.toml", "rb") as handle:
        table = tomllib.load(handle)["parameter"]
    for functional, (a1, s8, a2) in BJ.items():
        found = table[functional]["d3"]["bj"]
        assert (found["a1"], found["s8"], found["a2"]) == (a1, s8, a2), functional
    for functional, (rs6, s8) in ZERO.items():
        found = table[functional]["d3"]["zero"]
        assert (found["rs6"], found["s8"]) == (rs6, s8), functional
    assert {"pbe", "pbe0", "b3lyp", "r2scan", "tpss"} <= set(BJ)


@pytest.mark.parametrize("damping", ["bj", "zero"])
@pytest.mark.parametrize("make", [ethanol, rattled_nacl, rattled_silicon, small_slab])
def test_matches_simple_dftd3(damping, make):
    atoms = make()
    correction = D3Dispersion("pbe", damping)
    (result,) = correction.compute(Batch((system_of(atoms),), ALL))
    energy, forces, stress = simple_dftd3(atoms, "pbe", damping, correction.cutoff, correction.cutoff)
    assert result.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(result.forces, forces, atol=1e-5, rtol=0)
    if stress is None:
        assert result.stress is None
    else:
        np.testing.assert_allclose(result.stress, stress, atol=1e-7, rtol=0)


@pytest.mark.parametrize("functional", ["pbe0", "b3lyp", "r2scan", "tpss"])
def test_functionals_match_simple_dftd3(functional):
    atoms = rattled_nacl()
    correction = D3Dispersion(functional, "bj", cutoff=12.0, cn_cutoff=10.0)
    (result,) = correction.compute(Batch((system_of(atoms),), ALL))
    energy, forces, _ = simple_dftd3(atoms, functional, "bj", 12.0, 10.0)
    assert result.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(result.forces, forces, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [ethanol, rattled_silicon])
def test_forces_and_stress_are_derivatives(make):
    check_derivatives(D3Dispersion("pbe", "bj"), system_of(make()), f_tol=1e-7, s_tol=1e-8)


def test_batch_equals_one_by_one():
    systems = tuple(system_of(make()) for make in (rattled_nacl, ethanol, rattled_silicon, small_slab))
    assert_batch_equals_one_by_one(D3Dispersion(), systems, f_tol=1e-12, s_tol=1e-14)


def test_unknown_names_and_elements():
    with pytest.raises(ValueError, match="no D3\\(zero\\) parameters for 'r2scan'"):
        D3Dispersion("r2scan", "zero")
    with pytest.raises(ValueError, match="unknown D3 damping"):
        D3Dispersion("pbe", "bjm")
    atoms = Atoms(numbers=[1, 95], positions=[[0, 0, 0], [2, 0, 0]])
    with pytest.raises(InvalidSystemError) as error:
        D3Dispersion().compute(Batch((system_of(ethanol()), system_of(atoms)), ALL))
    assert error.value.field == "systems[1].atomic_numbers[1]"

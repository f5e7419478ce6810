"""Geometry checks: overlapping atoms, cells too small or too large, spans, and exact wrapping."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from mlipserve.errors import InvalidSystemError
from mlipserve.geometry import check_geometry, wrapped_positions
from mlipserve_client.convert import system_from_atoms


def _check(atoms, cutoff=6.0):
    check_geometry(system_from_atoms(atoms), "systems[1]", cutoff)


@pytest.mark.parametrize("atoms", [bulk("Si", cubic=True) * (3, 3, 3), molecule("C60"), fcc111("Pt", (3, 3, 4), vacuum=8),
                                   bulk("C", "diamond", a=3.57, cubic=True)])
def test_real_structures_pass(atoms):
    _check(atoms)


def test_overlapping_atoms_are_named():
    atoms = molecule("CH3CH2OH")
    atoms.positions[6] = atoms.positions[2] + [0.05, 0, 0]
    with pytest.raises(InvalidSystemError) as error:
        _check(atoms)
    assert error.value.field == "systems[1].positions[6]"
    assert "atoms 2 and 6 are 0.050 Å apart" in str(error.value)


def test_overlap_across_the_periodic_boundary():
    atoms = Atoms("Si2", positions=[[0.01, 1, 1], [4.99, 1, 1]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(InvalidSystemError, match="atoms 0 and 1 are 0.020 Å apart"):
        _check(atoms)
    atoms.pbc = False  # 4.98 Å apart without images
    _check(atoms)


def test_cell_far_too_small():
    with pytest.raises(InvalidSystemError, match="own periodic image"):
        _check(Atoms("Si", positions=[[0, 0, 0]], cell=[0.05, 30, 30], pbc=True))
    with pytest.raises(InvalidSystemError, match=r"is the cell in Å\?") as error:
        _check(Atoms("Si", positions=[[0, 0, 0]], cell=[0.5, 0.5, 0.5], pbc=True))
    assert error.value.field == "systems[1].cell"


def test_spans():
    with pytest.raises(InvalidSystemError, match="cell vector c is 2000 Å long"):
        _check(Atoms("Si", cell=[5, 5, 2000], pbc=True))
    _check(Atoms("Si", cell=[5, 5, 2000], pbc=[True, True, False]))
    with pytest.raises(InvalidSystemError, match="span 1500 Å along y"):
        _check(Atoms("H2", positions=[[0, 0, 0], [0, 1500, 0]]))


@pytest.mark.parametrize("atoms", [bulk("Si", cubic=True), fcc111("Cu", (2, 2, 3), vacuum=5), molecule("H2O")])
def test_wrapping_is_a_lattice_translation(atoms, rng):
    atoms = atoms.copy()
    periodic = np.array(atoms.pbc)
    if periodic.any():
        shifts = rng.integers(-50, 50, size=(len(atoms), 3)) * periodic
        atoms.positions += shifts @ atoms.cell.array
    atoms.positions += rng.normal(size=3) * 30 * ~periodic
    system = system_from_atoms(atoms)
    wrapped = wrapped_positions(system)
    delta = wrapped - system.positions
    if periodic.any():
        frac = np.linalg.solve(atoms.cell.array.T, (delta - delta[0] * ~periodic).T).T
        np.testing.assert_allclose(frac, np.round(frac), atol=1e-9)  # whole cells along periodic axes
        inside = np.linalg.solve(atoms.cell.array.T, wrapped.T).T[:, periodic]
        assert (inside >= 0).all() and (inside < 1).all()
    else:
        np.testing.assert_allclose(delta, np.broadcast_to(delta[0], delta.shape), atol=1e-12)  # one rigid shift


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, False, False)])
def test_closest_pair_agrees_with_vesin(pbc, rng):
    """The scipy search (torch-free, for the ingress) against vesin's neighbour list."""
    from vesin import NeighborList

    from mlipserve.geometry import closest_pair
    from mlipserve_client.types import System

    cell = np.array([[6.0, 0.0, 0.0], [2.5, 5.5, 0.0], [1.0, 1.5, 7.0]])  # triclinic
    for _ in range(5):
        positions = rng.uniform(-3, 9, size=(150, 3))
        system = System(numbers=np.ones(150, dtype=int), positions=positions,
                        cell=cell if any(pbc) else None, pbc=np.array(pbc))
        got = closest_pair(system, 0.6)
        i, j, d = NeighborList(cutoff=0.6, full_list=False).compute(
            positions, cell if any(pbc) else np.zeros((3, 3)), list(pbc), quantities="ijd")
        if not len(d):
            assert got is None
            continue
        k = int(np.argmin(d))
        assert got is not None and got[2] == pytest.approx(d[k], abs=1e-9)
        assert (got[0], got[1]) == tuple(sorted((int(i[k]), int(j[k]))))


def test_the_front_door_imports_no_torch():
    """Its validation (geometry, limits, corrections) runs on the replica's event loop without the
    models' stack; torch comes only with the models themselves."""
    import subprocess
    import sys

    code = ("import sys, mlipserve.server.frontdoor, mlipserve.server.sessions, mlipserve.app; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]

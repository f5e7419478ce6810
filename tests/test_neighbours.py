"""The skin neighbour-list cache alone (mlipserve.neighbours): the edges it gives equal ASE's fresh
search at every step of a random walk (crystals with atoms on the cell faces, a cell smaller than the
cutoff, a slab, a molecule), and its rebuild rules: displacement just under and just over skin/2, a
changed cell, a wrapped atom, a jump along a non-periodic axis, changed species, atoms or pbc, and the
LRU bounds."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from mlipserve.backends.base import Batch
from mlipserve.geometry import wrapped_positions
from mlipserve.neighbours import ListCounts, VerletCache
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import DEFAULT_PROPERTIES

CUTOFF = 4.0
SKIN = 0.6


def _triclinic() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43) * (2, 2, 1)
    atoms.set_cell(atoms.cell.array + [[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.2, -0.4, 0.0]], scale_atoms=True)
    return atoms


STRUCTURES = {
    # Conventional diamond: atoms sit on the faces, so they wrap back and forth.
    "cubic": lambda: bulk("Si", "diamond", a=5.43, cubic=True),
    # A cell narrower than the cutoff: atoms see several images of themselves.
    "primitive": lambda: bulk("Si", "diamond", a=5.43),
    "triclinic": _triclinic,
    "slab": lambda: fcc111("Cu", (2, 2, 3), vacuum=5.0),
    "molecule": lambda: molecule("CH3CH2OH"),
}


def _fresh(atoms: Atoms) -> dict[tuple[int, int, tuple[int, ...]], np.ndarray]:
    """ASE's own neighbour search at the positions a backend gives the model (wrapped)."""
    wrapped = atoms.copy()
    wrapped.positions = wrapped_positions(system_from_atoms(atoms))
    i, j, shifts, vectors = neighbor_list("ijSD", wrapped, CUTOFF)
    return {(a, b, tuple(s)): v for a, b, s, v in zip(i.tolist(), j.tolist(), shifts.tolist(), vectors)}


def _edges(cache: VerletCache, atoms: Atoms, key="md") -> dict[tuple[int, int, tuple[int, ...]], np.ndarray]:
    system = system_from_atoms(atoms)
    edges = cache.edges(key, wrapped_positions(system), system.cell, system.pbc, system.numbers)
    return {(a, b, tuple(s)): v for a, b, s, v in zip(edges.i.tolist(), edges.j.tolist(), edges.shifts.tolist(),
                                                       edges.vectors)}


def _counts(cache: VerletCache, key="md") -> ListCounts:
    return cache.stats().sessions[key]


@pytest.mark.parametrize("name", STRUCTURES)
def test_edges_equal_a_fresh_search_along_a_random_walk(name):
    atoms = STRUCTURES[name]()
    rng = np.random.default_rng(5)
    velocities = rng.normal(scale=0.03, size=atoms.positions.shape)
    cache = VerletCache(CUTOFF, SKIN)
    for _ in range(60):
        atoms.positions += velocities + rng.normal(scale=0.01, size=velocities.shape)
        got, expected = _edges(cache, atoms), _fresh(atoms)
        assert got.keys() == expected.keys()
        assert max(np.abs(got[k] - expected[k]).max() for k in got) < 1e-12
    counts = cache.stats().total
    assert 1 < counts.rebuilds < counts.steps == 60


def test_displacement_just_under_half_the_skin_reuses_and_just_over_rebuilds():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions += 0.3  # off the faces: no atom wraps
    cache = VerletCache(CUTOFF, SKIN)
    _edges(cache, atoms)
    start = atoms.positions.copy()
    atoms.positions[3] = start[3] + [SKIN / 2 - 1e-9, 0.0, 0.0]
    assert _edges(cache, atoms).keys() == _fresh(atoms).keys()
    assert _counts(cache) == ListCounts(steps=2, rebuilds=1)
    atoms.positions[3] = start[3] + [SKIN / 2 + 1e-9, 0.0, 0.0]
    assert _edges(cache, atoms).keys() == _fresh(atoms).keys()
    assert _counts(cache) == ListCounts(steps=3, rebuilds=2)


def test_wrapped_atom_keeps_the_list_and_its_edges_follow():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=3)
    cache = VerletCache(CUTOFF, SKIN)
    _edges(cache, atoms)
    atoms.positions[5] += atoms.cell[0] - 2 * atoms.cell[2] + [0.05, 0.0, 0.0]
    atoms.positions[0] -= atoms.cell[1]
    got, expected = _edges(cache, atoms), _fresh(atoms)
    assert got.keys() == expected.keys()
    assert _counts(cache) == ListCounts(steps=2, rebuilds=1)


@pytest.mark.parametrize("change", ["cell", "species", "atoms", "pbc", "non-periodic jump"])
def test_changes_that_rebuild(change):
    atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    atoms.rattle(0.02, seed=4)
    lowest = int(np.argmin(atoms.positions[:, 2]))
    atoms.positions[:, 2] -= atoms.positions[lowest, 2] - 0.01  # the slab starts just above c = 0
    cache = VerletCache(CUTOFF, SKIN)
    _edges(cache, atoms)
    if change == "cell":
        atoms.set_cell(atoms.cell.array * (1 + 1e-9), scale_atoms=True)
    elif change == "species":
        atoms.numbers[0] = 28
    elif change == "atoms":
        atoms += Atoms("Cu", positions=[atoms.positions[0] + [0.0, 0.0, 2.2]])
    elif change == "pbc":
        atoms.pbc = True
    else:  # one atom below c = 0: wrapped_positions moves the whole slab up by its c vector
        atoms.positions[lowest, 2] -= 0.02
    got, expected = _edges(cache, atoms), _fresh(atoms)
    assert got.keys() == expected.keys()
    assert _counts(cache) == ListCounts(steps=2, rebuilds=2)


def test_sessions_are_bounded_least_recently_used_first():
    atoms = molecule("CH3CH2OH")
    cache = VerletCache(CUTOFF, SKIN, max_sessions=3)
    for key in ("a", "b", "c"):
        _edges(cache, atoms, key)
    _edges(cache, atoms, "a")  # a is now the most recently used
    _edges(cache, atoms, "d")
    stats = cache.stats()
    assert list(stats.sessions) == ["c", "a", "d"]
    assert stats.sessions["a"] == ListCounts(steps=2, rebuilds=1)
    assert stats.evicted == 1
    assert stats.total == ListCounts(steps=5, rebuilds=4)
    _edges(cache, atoms, "b")  # evicted: built again
    assert cache.stats().sessions["b"] == ListCounts(steps=1, rebuilds=1)


def test_pairs_are_bounded_but_the_newest_session_is_kept():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    cache = VerletCache(CUTOFF, SKIN, max_pairs=10)
    _edges(cache, atoms, "a")
    _edges(cache, atoms, "b")
    assert list(cache.stats().sessions) == ["b"]


def test_a_skin_must_be_positive():
    with pytest.raises(ValueError, match="skin"):
        VerletCache(CUTOFF, skin=0.0)


def test_batch_keys_one_per_system_or_none():
    system = system_from_atoms(molecule("H2O"))
    assert Batch((system, system), DEFAULT_PROPERTIES).neighbour_key(1) is None
    assert Batch((system, system), DEFAULT_PROPERTIES, neighbour_keys=("a", None)).neighbour_key(0) == "a"
    with pytest.raises(ValueError, match="1 neighbour keys for 2 systems"):
        Batch((system, system), DEFAULT_PROPERTIES, neighbour_keys=("a",))

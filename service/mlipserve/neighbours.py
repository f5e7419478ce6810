"""Neighbour lists kept with a skin between the steps of an MD session (LAMMPS's ``neighbor`` skin
with ``neigh_modify check yes``), for backends that build their own edges.

A session's list holds the candidate pairs (i, j, cell shift) closer than cutoff + skin when it was
built. Each step recomputes their distances at the current positions and keeps those within the
cutoff, which is exactly the edge set a fresh search gives (in another order): a pair within the
cutoff now was within cutoff + skin at the build while no atom has moved more than skin/2. The list
is rebuilt when an atom has moved further, the cell changed at all, or the atoms (count, species) or
the periodic axes changed.

Clients may wrap atoms back into the cell, and the backends wrap them anyway: a wrapped atom jumps by
a lattice vector n·cell. Displacements are therefore taken modulo lattice vectors along periodic
axes (n rounded in fractional coordinates), and a jump is folded into the shifts of the atom's pairs
(S + n_i - n_j), so an atom crossing a face costs no rebuild. A jump along a non-periodic axis (the
backends move a slab or molecule as a whole) counts as a move, and rebuilds.

numpy and vesin only (vesin takes any mix of periodic axes); nothing here knows a model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from vesin import NeighborList

# Å: LAMMPS's default skin in metal units. In 300 K Si an atom moves ~0.01 Å per 1 fs step and
# vibrates ~0.1 Å about its site, so a list lasts far longer than a few steps.
DEFAULT_SKIN = 2.0
DEFAULT_SESSIONS = 256
# Candidate pairs kept over all sessions (64 bytes each): 10 M pairs are ~0.6 GB, 140,000 atoms of
# Si at a 5 Å cutoff + 2 Å skin (256 sessions of 64 atoms hold 1.2 M).
DEFAULT_MAX_PAIRS = 10_000_000


@dataclass(frozen=True)
class Edges:
    """Directed pairs closer than the cutoff: atom j seen from atom i at ``r_j - r_i + shifts @ cell``
    (``vectors``), both directions of each pair, periodic images of an atom itself included."""

    i: np.ndarray  # (e,) int64
    j: np.ndarray  # (e,) int64
    shifts: np.ndarray  # (e, 3) int64: cell vectors crossed
    vectors: np.ndarray  # (e, 3) float64, Å


@dataclass(frozen=True)
class ListCounts:
    """Steps served from one session's list, and how many of them built it anew."""

    steps: int = 0
    rebuilds: int = 0

    @property
    def rebuild_fraction(self) -> float:
        return self.rebuilds / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class NeighbourStats:
    """A cache's counters: ``total`` over every session since it was made (evicted ones included);
    ``sessions`` for those it keeps now, least recently used first."""

    cutoff: float
    skin: float
    total: ListCounts
    sessions: dict[Hashable, ListCounts]
    evicted: int


def canonical_order(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """The permutation that sorts directed pairs by (i, j, shift). Backends hand their model pairs in
    this order whether they come from a fresh search or a kept list: float32 models sum messages in
    edge order, and the same edges in another order move their forces by ~1e-5 eV/Å, so a session's
    steps would otherwise differ from unary calls."""
    return np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))


def lattice_vectors(shifts: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``shifts @ cell`` for (n, 3) integer shifts, without BLAS: for so thin a product its threads
    only contend with vesin's or torch's (5-10x slower than this loop here, right after a build)."""
    return np.einsum("ni,ij->nj", shifts.astype(np.float64), cell)


class _List:
    """One session's candidates and the geometry they were built for."""

    def __init__(self, positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray, numbers: np.ndarray,
                 reach: float) -> None:
        box = cell if cell is not None else np.zeros((3, 3))
        i, j, shifts = NeighborList(cutoff=reach, full_list=True).compute(
            positions, box, pbc.tolist(), quantities="ijS"
        )
        self.i, self.j = i.astype(np.int64), j.astype(np.int64)
        self.shifts = shifts.astype(np.int64)
        self.shift_vectors = lattice_vectors(self.shifts, box)
        self.positions = positions.copy()
        self.cell = None if cell is None else cell.copy()
        self.pbc = pbc.copy()
        self.numbers = numbers.copy()
        # Fractional displacements along periodic axes only (pinv: a non-periodic row may be zero).
        self.to_fractional = np.linalg.pinv(box) * pbc if pbc.any() else None
        self.counts = ListCounts()

    def jumps(self, positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray, numbers: np.ndarray,
              limit: float) -> np.ndarray | None:
        """The lattice vectors (n, 3) each atom jumped by since the build, if the list still holds;
        None if it must be rebuilt."""
        same_cell = cell is None if self.cell is None else cell is not None and np.array_equal(cell, self.cell)
        if not (same_cell and np.array_equal(pbc, self.pbc) and np.array_equal(numbers, self.numbers)):
            return None
        moved = positions - self.positions
        jumped = np.zeros(moved.shape, dtype=np.int64)
        if self.to_fractional is not None:
            jumped = np.rint(moved @ self.to_fractional).astype(np.int64)
            if jumped.any():
                moved = moved - lattice_vectors(jumped, cell)
        if np.einsum("ij,ij->i", moved, moved).max(initial=0.0) > limit * limit:
            return None
        return jumped

    def within(self, positions: np.ndarray, jumped: np.ndarray, cell: np.ndarray | None, cutoff: float) -> Edges:
        crossed = jumped.any()
        if crossed:
            # Each atom's image nearest its position at the build.
            positions = positions - lattice_vectors(jumped, cell)
        vectors = np.take(positions, self.j, axis=0)
        vectors -= np.take(positions, self.i, axis=0)
        vectors += self.shift_vectors
        keep = np.flatnonzero(np.einsum("ij,ij->i", vectors, vectors) < cutoff * cutoff)
        i, j, shifts = self.i[keep], self.j[keep], self.shifts[keep]
        if crossed:
            shifts += jumped[i] - jumped[j]
        return Edges(i, j, shifts, vectors[keep])


class VerletCache:
    """Skin neighbour lists of ``cutoff`` for up to ``max_sessions`` sessions (least recently used
    evicted first; also while more than ``max_pairs`` candidate pairs are kept), each under a hashable
    key. Thread-safe: a replica may compute from several threads.

    A pair is within the cutoff when closer than ``cutoff + tolerance``: 0 matches the strict
    ``d < cutoff`` of matscipy and ASE, 1e-8 the ``numerical_tol`` that pymatgen adds (a pair exactly
    at the cutoff, such as an atom's image one 6 Å cell away, is in one and not the other)."""

    def __init__(self, cutoff: float, skin: float = DEFAULT_SKIN, max_sessions: int = DEFAULT_SESSIONS,
                 max_pairs: int = DEFAULT_MAX_PAIRS, tolerance: float = 0.0) -> None:
        if not skin > 0:
            raise ValueError(f"the neighbour-list skin must be positive (Å), not {skin!r}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions!r}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self._within = self.cutoff + tolerance
        self.max_sessions = max_sessions
        self.max_pairs = max_pairs
        self._lists: OrderedDict[Hashable, _List] = OrderedDict()
        self._pairs = 0
        self._steps = 0
        self._rebuilds = 0
        self._evicted = 0
        self._lock = threading.Lock()

    def edges(self, key: Hashable, positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray,
              numbers: np.ndarray) -> Edges:
        """The pairs within the cutoff at ``positions`` (Å; the ones the model is given), from the list
        kept under ``key`` if it still holds, else from a new one kept in its place. ``cell`` is None
        for a system without one (then no axis may be periodic)."""
        positions = np.asarray(positions, dtype=np.float64)
        cell = None if cell is None else np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        with self._lock:
            kept = self._lists.pop(key, None)
            if kept is not None:
                self._pairs -= len(kept.i)
        counts = kept.counts if kept is not None else ListCounts()
        jumped = None if kept is None else kept.jumps(positions, cell, pbc, numbers, self.skin / 2)
        rebuilt = jumped is None
        if rebuilt:
            kept = _List(positions, cell, pbc, numbers, self._within + self.skin)
            jumped = np.zeros(positions.shape, dtype=np.int64)
        kept.counts = ListCounts(counts.steps + 1, counts.rebuilds + rebuilt)
        edges = kept.within(positions, jumped, cell, self._within)
        with self._lock:
            self._steps += 1
            self._rebuilds += rebuilt
            self._store(key, kept)
        return edges

    def stats(self) -> NeighbourStats:
        with self._lock:
            return NeighbourStats(
                cutoff=self.cutoff,
                skin=self.skin,
                total=ListCounts(self._steps, self._rebuilds),
                sessions={key: kept.counts for key, kept in self._lists.items()},
                evicted=self._evicted,
            )

    def _store(self, key: Hashable, kept: _List) -> None:
        self._lists[key] = kept
        self._pairs += len(kept.i)
        while len(self._lists) > self.max_sessions or (self._pairs > self.max_pairs and len(self._lists) > 1):
            _, evicted = self._lists.popitem(last=False)
            self._pairs -= len(evicted.i)
            self._evicted += 1

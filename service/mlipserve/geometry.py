"""Geometry checks that keep a model from producing NaN or exhausting memory on a nonsense structure.

Overlapping atoms make every model's radial basis divide by zero (CHGNet returns NaN); a cell far too
small for its atoms (a cell in nm or bohr sent as Å, say) gives each atom thousands of neighbours
within the cutoff, and CHGNet's three-body angles then take more memory than the machine has.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.spatial import cKDTree

from mlipserve.errors import InvalidSystemError
from mlipserve_client.types import System

# Closer than this (Å), two atoms overlap; no bond is shorter than H2's 0.74 Å.
MIN_DISTANCE = 0.1
# Dense solids have 50-150 neighbours within 6 Å (diamond ~160); 1000 is ~6x the densest.
MAX_NEIGHBOURS_PER_ATOM = 1000
# Longest periodic cell vector, and widest extent along a non-periodic axis (Å). A million-atom box
# is ~230 Å wide; cell-list neighbour searches allocate memory for the whole span.
MAX_SPAN = 1000.0
_AXES = "abc"


def check_geometry(system: System, where: str, cutoff: float,
                   max_neighbours_per_atom: float = MAX_NEIGHBOURS_PER_ATOM) -> None:
    """Raise InvalidSystemError for overlapping atoms, an unphysically dense periodic cell, or a
    system spanning more than MAX_SPAN."""
    _check_span(system, where)
    if system.is_periodic:
        volume = abs(float(np.linalg.det(system.cell)))
        density = system.n_atoms / volume
        neighbours = density * 4.0 / 3.0 * math.pi * cutoff**3
        if neighbours > max_neighbours_per_atom:
            raise InvalidSystemError(
                f"{where}.cell",
                f"{system.n_atoms} atoms in {volume:.3g} Å³ ({density:.3g} atoms/Å³) would give each atom "
                f"~{neighbours:.0f} neighbours within the model's {cutoff:g} Å cutoff (dense solids have "
                f"~50-150; this server's limit is {max_neighbours_per_atom:g}, "
                f"server.limits.max_neighbours_per_atom): is the cell in Å?",
            )
    pair = closest_pair(system, MIN_DISTANCE)
    if pair is not None:
        a, b, distance = pair
        if a == b:
            message = f"atom {a} is {distance:.3f} Å from its own periodic image: the cell is too small"
        else:
            message = f"atoms {a} and {b} are {distance:.3f} Å apart (closer than {MIN_DISTANCE} Å): they overlap"
        raise InvalidSystemError(f"{where}.positions[{b}]", message)


def closest_pair(system: System, within: float) -> tuple[int, int, float] | None:
    """The closest two atoms (a <= b; a == b: an atom and its own image) less than ``within`` Å apart,
    periodic images included, or None. A k-d tree over the atoms plus the images of those within
    ``within`` of a periodic face: scipy only, no torch, so the front door can afford it."""
    positions = wrapped_positions(system) if system.cell is not None else system.positions
    owners = np.arange(system.n_atoms)
    points = positions
    if system.is_periodic:
        frac = np.linalg.solve(system.cell.T, positions.T).T
        heights = abs(np.linalg.det(system.cell)) / np.linalg.norm(
            np.cross(system.cell[[1, 2, 0]], system.cell[[2, 0, 1]]), axis=1)
        near = within / heights  # fractional distance from a face that counts as near
        shifts = np.array([s for s in itertools.product(*[(-1, 0, 1) if p else (0,) for p in system.pbc]) if any(s)])
        # An image shifted by +1 along k matters for atoms near the low face (frac < near), and so
        # on; all shifts at once (one array operation, not 26: this runs for every request).
        close = np.all((shifts[:, None, :] == 0) | ((shifts[:, None, :] > 0) & (frac < near))
                       | ((shifts[:, None, :] < 0) & (frac > 1 - near)), axis=2)
        image, atom = np.nonzero(close)
        points = np.concatenate([positions, positions[atom] + shifts[image] @ system.cell])
        owners = np.concatenate([owners, atom])
    pairs = cKDTree(points).query_pairs(within, output_type="ndarray")
    if not len(pairs):
        return None
    distances = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    k = int(np.argmin(distances))
    a, b = sorted((int(owners[pairs[k, 0]]), int(owners[pairs[k, 1]])))
    return a, b, float(distances[k])


def _check_span(system: System, where: str) -> None:
    if system.cell is not None:
        lengths = np.linalg.norm(system.cell, axis=1)
        for axis, (periodic, length) in enumerate(zip(system.pbc, lengths)):
            if periodic and length > MAX_SPAN:
                raise InvalidSystemError(
                    f"{where}.cell",
                    f"cell vector {_AXES[axis]} is {length:.4g} Å long; periodic cells may be at most {MAX_SPAN:g} Å",
                )
    if system.is_periodic:
        return  # along periodic axes atoms are wrapped into the cell; non-periodic spans checked below
    span = np.ptp(system.positions, axis=0)
    if span.max() > MAX_SPAN:
        axis = int(np.argmax(span))
        raise InvalidSystemError(
            f"{where}.positions",
            f"the atoms span {span[axis]:.4g} Å along {'xyz'[axis]}; a non-periodic system may span at most "
            f"{MAX_SPAN:g} Å",
        )


def wrapped_positions(system: System) -> np.ndarray:
    """Positions moved into the cell along periodic axes, and the whole system shifted to start at
    fractional 0 along non-periodic ones. Energies, forces and stress are unchanged (lattice
    translations and one rigid shift), but float32 models keep their precision: with an atom 200
    cells (~1000 Å) outside its cell, CHGNet's own calculator is off by 8e-4 eV/Å."""
    if system.cell is None:
        return system.positions - system.positions.min(axis=0)
    frac = np.linalg.solve(system.cell.T, system.positions.T).T
    periodic = system.pbc
    frac[:, periodic] -= np.floor(frac[:, periodic])
    frac[:, ~periodic] -= np.floor(frac[:, ~periodic].min(axis=0))
    return frac @ system.cell

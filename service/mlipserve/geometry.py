"""Geometry checks that keep a model from producing NaN or exhausting memory on a nonsense structure.

Overlapping atoms make every model's radial basis divide by zero (CHGNet returns NaN); a cell far too
small for its atoms (a cell in nm or bohr sent as Å, say) gives each atom thousands of neighbours
within the cutoff, and CHGNet's three-body angles then take more memory than the machine has.
"""

from __future__ import annotations

import math

import numpy as np
from vesin import NeighborList

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


def check_geometry(system: System, where: str, cutoff: float) -> None:
    """Raise InvalidSystemError for overlapping atoms, an unphysically dense periodic cell, or a
    system spanning more than MAX_SPAN."""
    _check_span(system, where)
    if system.is_periodic:
        volume = abs(float(np.linalg.det(system.cell)))
        density = system.n_atoms / volume
        neighbours = density * 4.0 / 3.0 * math.pi * cutoff**3
        if neighbours > MAX_NEIGHBOURS_PER_ATOM:
            raise InvalidSystemError(
                f"{where}.cell",
                f"{system.n_atoms} atoms in {volume:.3g} Å³ ({density:.3g} atoms/Å³) would give each atom "
                f"~{neighbours:.0f} neighbours within the model's {cutoff:g} Å cutoff (dense solids have "
                f"~50-150): is the cell in Å?",
            )
    box = system.cell if system.cell is not None else np.zeros((3, 3))
    i, j, d = NeighborList(cutoff=MIN_DISTANCE, full_list=False).compute(
        system.positions, box, system.pbc.tolist(), quantities="ijd"
    )
    if len(d):
        k = int(np.argmin(d))
        a, b = sorted((int(i[k]), int(j[k])))
        if a == b:
            message = f"atom {a} is {d[k]:.3f} Å from its own periodic image: the cell is too small"
        else:
            message = f"atoms {a} and {b} are {d[k]:.3f} Å apart (closer than {MIN_DISTANCE} Å): they overlap"
        raise InvalidSystemError(f"{where}.positions[{b}]", message)


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

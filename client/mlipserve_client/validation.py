"""Checks that a system is physically meaningful, with messages that name the field and atom."""

from __future__ import annotations

import numpy as np

from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import System

MAX_ATOMIC_NUMBER = 118
# A periodic cell thinner than this (Å³) is numerically singular for every model we serve.
MIN_CELL_VOLUME = 1e-6
# Per-atom charges must add up to the total charge to this precision (e).
CHARGE_SUM_TOLERANCE = 1e-6
# Coordinates and cell components beyond this (Å, 0.1 mm) are no atomistic system; products of
# them (cell volumes, squared distances) would overflow float64.
MAX_COORDINATE = 1e6
_AXES = "abc"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_system(system: System, where: str) -> None:
    """Raise InvalidSystemError for the first problem found in ``system`` (``where`` prefixes fields)."""
    numbers, positions, cell, pbc = system.numbers, system.positions, system.cell, system.pbc
    if system.n_atoms == 0:
        raise InvalidSystemError(f"{where}.atomic_numbers", "the system has no atoms")
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        i = _first(bad)
        raise InvalidSystemError(
            f"{where}.atomic_numbers[{i}]",
            f"atom {i} has atomic number {numbers[i]}, which is not an element (1-{MAX_ATOMIC_NUMBER})",
        )
    bad_atoms = ~np.isfinite(positions).all(axis=1)
    if bad_atoms.any():
        i = _first(bad_atoms)
        raise InvalidSystemError(
            f"{where}.positions[{i}]", f"atom {i} has a non-finite position {positions[i].tolist()}"
        )
    far_atoms = (np.abs(positions) > MAX_COORDINATE).any(axis=1)
    if far_atoms.any():
        i = _first(far_atoms)
        raise InvalidSystemError(
            f"{where}.positions[{i}]",
            f"atom {i} is at {positions[i].tolist()} Å, beyond ±{MAX_COORDINATE:g} Å: not an atomistic system")
    if not np.isfinite(system.total_charge):
        raise InvalidSystemError(f"{where}.total_charge", f"total charge {system.total_charge} is not finite")
    electrons = int(numbers.sum())  # of the neutral system
    if abs(system.total_charge) > electrons:
        raise InvalidSystemError(
            f"{where}.total_charge",
            f"total charge {system.total_charge:g} e is more than the system's {electrons} electrons (neutral)")
    max_multiplicity = electrons - round(system.total_charge) + 1
    if not 0 <= system.spin_multiplicity <= max_multiplicity:
        raise InvalidSystemError(
            f"{where}.spin_multiplicity",
            f"spin multiplicity {system.spin_multiplicity} is impossible with {electrons - round(system.total_charge)} "
            f"electrons (0 = the model's default, else 1-{max_multiplicity})")
    if system.atomic_charges is not None:
        charges = system.atomic_charges
        if not np.isfinite(charges).all():
            i = _first(~np.isfinite(charges))
            raise InvalidSystemError(f"{where}.atomic_charges[{i}]", f"atom {i} has a non-finite charge {charges[i]}")
        if abs(charges.sum() - system.total_charge) > CHARGE_SUM_TOLERANCE:
            raise InvalidSystemError(
                f"{where}.atomic_charges",
                f"the atomic charges sum to {charges.sum():.9g} e but total_charge is {system.total_charge:.9g} e",
            )
    periodic_axes = "".join(a for a, p in zip(_AXES, pbc) if p)
    if cell is None:
        if periodic_axes:
            raise InvalidSystemError(
                f"{where}.cell", f"the system is periodic along {periodic_axes} but has no cell"
            )
        return
    if not np.isfinite(cell).all():
        row = _first(~np.isfinite(cell).all(axis=1))
        raise InvalidSystemError(
            f"{where}.cell", f"cell vector {_AXES[row]} is not finite: {cell[row].tolist()}"
        )
    if (np.abs(cell) > MAX_COORDINATE).any():
        row = _first((np.abs(cell) > MAX_COORDINATE).any(axis=1))
        raise InvalidSystemError(
            f"{where}.cell",
            f"cell vector {_AXES[row]} {cell[row].tolist()} Å has a component beyond ±{MAX_COORDINATE:g} Å")
    volume = abs(float(np.linalg.det(cell)))
    if periodic_axes and volume < MIN_CELL_VOLUME:
        raise InvalidSystemError(
            f"{where}.cell",
            f"the cell is singular (volume {volume:.3g} Å³) but the system is periodic along "
            f"{periodic_axes}: give three independent cell vectors",
        )

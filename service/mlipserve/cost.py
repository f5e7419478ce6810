"""How much work a system is for a model: the number that batch budgets and queue bounds count.

Forward-pass time and memory of message-passing models grow with atoms plus neighbour pairs within
the cutoff (and, for CHGNet, bond angles). Estimated analytically from the density, in O(1): a
neighbour search per request would cost as much as the model's own.
"""

from __future__ import annotations

import math

import numpy as np

from mlipserve_client.types import System

# Atoms per Å³ assumed around an atom of a non-periodic system (condensed matter is ~0.05-0.2).
_LOCAL_DENSITY = 0.1


def neighbours_per_atom(system: System, cutoff: float) -> float:
    """Expected neighbours within ``cutoff`` of an atom (self-images of small cells included)."""
    sphere = 4.0 / 3.0 * math.pi * cutoff**3
    if system.is_periodic and system.pbc.all():
        density = system.n_atoms / abs(float(np.linalg.det(system.cell)))
        return density * sphere
    # At most every other atom (plus images along periodic axes, bounded by the local density).
    bound = _LOCAL_DENSITY * sphere
    if system.is_periodic:
        return bound
    return min(system.n_atoms - 1, bound)


def pair_work(system: System, cutoff: float) -> float:
    """Atoms plus directed neighbour pairs within ``cutoff``."""
    return system.n_atoms * (1.0 + neighbours_per_atom(system, cutoff))


def angle_work(system: System, cutoff: float, bond_cutoff: float) -> float:
    """pair_work plus bond angles (pairs of bonds shorter than ``bond_cutoff`` at each atom)."""
    bonds = neighbours_per_atom(system, bond_cutoff)
    return pair_work(system, cutoff) + system.n_atoms * bonds * bonds

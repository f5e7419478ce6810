"""Ewald and PME parameters chosen analytically, once per system shape, and cached.

torch-pme's tuners time a grid of candidate parameters on the structure itself (5-33 s): far too slow
for a request path. Here the parameters follow from Gaussian-tail error estimates and a cost model
instead, which cost microseconds, and are cached anyway so that a cell fluctuating slightly (NPT)
keeps the same parameters (and so a smooth energy) from step to step.

With torch-pme's smearing σ (the charge Gaussians are exp(-r²/2σ²); the real-space kernel is
erfc(r/√2σ)/r and the reciprocal one exp(-σ²k²/2)/k²), and s = sqrt(-2 ln(accuracy/10)):

- real space: cutoff r_c = s·σ, so the dropped tail is exp(-r_c²/2σ²) = accuracy/10;
- Ewald: all k up to k_max = s/σ (lr_wavelength = π/k_max: torch-pme's k box reaches π/lr_wavelength
  along each axis);
- PME: 6-node Lagrange interpolation, whose relative energy error behaves as A·(h/σ)^6 with A ≈ 0.05
  (measured, worst of random 64- and 512-atom cells against an Ewald reference at 1e-13), so the grid
  spacing must be h ≤ c·σ with c = (accuracy/A)^(1/6). torch-pme puts 2·L/mesh_spacing + 1 points,
  rounded up to a power of two, along a cell vector of length L.

σ then sets the split of work between real space (pairs ∝ N²/V·r_c³) and reciprocal space (Ewald:
k-vectors × atoms ∝ N·V/σ³; PME: grid points ∝ V/σ³). σ is the minimum of a cost model whose weights
were measured on this CPU, one thread (forward + backward, float64): 3 units per real-space pair, 1.5 per
k-vector × atom, 1 per PME grid point. For PME the candidates are the σ at which some axis' grid
drops to the next power of two, since cost jumps 2× there and accuracy does not.

Measured (tests/test_physics_electrostatics.py): Madelung constants to <1e-7 relative, pymatgen's
Ewald energy to <1e-6 relative (forces 3e-5 eV/Å for PME) at the default accuracy 1e-6.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

INTERPOLATION_NODES = 6
# Measured constant of the 6-node PME relative energy error A·(h/σ)^6 (module docstring).
_PME_ERROR_CONSTANT = 0.05
# Cost weights (module docstring) and bounds that keep one evaluation's tensors to a few GB.
_PAIR_COST, _KVECTOR_COST, _MESH_COST = 3.0, 1.5, 1.0
_MAX_MESH_POINTS = 1 << 25
_SMEARING_RANGE = (0.3, 30.0)  # Å
# Cells that agree to this many decimals (Å) share cached parameters.
_CELL_DECIMALS = 2


@dataclass(frozen=True)
class EwaldParameters:
    smearing: float  # Å
    lr_wavelength: float  # Å
    cutoff: float  # Å, real-space neighbour cutoff


@dataclass(frozen=True)
class PMEParameters:
    smearing: float  # Å
    mesh_spacing: float  # Å, torch-pme's convention (grid spacing ≤ mesh_spacing/2)
    cutoff: float  # Å
    interpolation_nodes: int = INTERPOLATION_NODES


def _tail_factor(accuracy: float) -> float:
    """s with exp(-s²/2) = accuracy/10: real space and Ewald's reciprocal space each get a tenth."""
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must be in (0, 1), got {accuracy}")
    return math.sqrt(-2.0 * math.log(accuracy / 10.0))


def _pairs(n_atoms: int, volume: float, cutoff: float) -> float:
    """Expected half-list pairs within cutoff at uniform density."""
    return n_atoms * (n_atoms / volume) * (2.0 / 3.0) * math.pi * cutoff**3


def ewald_parameters(cell: np.ndarray, n_atoms: int, accuracy: float) -> EwaldParameters:
    s = _tail_factor(accuracy)
    lengths = np.linalg.norm(cell, axis=1)
    volume = abs(float(np.linalg.det(cell)))

    def cost(smearing: float) -> float:
        kvectors = np.prod(np.ceil(lengths * s / (math.pi * smearing)))
        return _PAIR_COST * _pairs(n_atoms, volume, s * smearing) + _KVECTOR_COST * kvectors * n_atoms

    smearing = float(min(np.geomspace(*_SMEARING_RANGE, 200), key=cost))
    return EwaldParameters(smearing=smearing, lr_wavelength=math.pi * smearing / s, cutoff=s * smearing)


def pme_parameters(cell: np.ndarray, n_atoms: int, accuracy: float) -> PMEParameters:
    s = _tail_factor(accuracy)
    c = (accuracy / _PME_ERROR_CONSTANT) ** (1.0 / INTERPOLATION_NODES)
    lengths = np.linalg.norm(cell, axis=1)
    volume = abs(float(np.linalg.det(cell)))

    def mesh_points(smearing: float) -> float:
        # torch-pme's get_ns_mesh with mesh_spacing = 2cσ.
        return float(np.prod(2.0 ** np.ceil(np.log2(lengths / (c * smearing) + 1.0))))

    def cost(smearing: float) -> float:
        points = mesh_points(smearing)
        if points > _MAX_MESH_POINTS:
            return math.inf
        return _PAIR_COST * _pairs(n_atoms, volume, s * smearing) + _MESH_COST * points

    # Just above the σ at which an axis' grid falls to p points (2^k): h = L/p ≤ cσ still holds.
    candidates = [1.001 * float(length) / (c * (2**k - 1)) for length in lengths for k in range(2, 11)]
    candidates = [x for x in candidates if _SMEARING_RANGE[0] <= x <= _SMEARING_RANGE[1]] or [_SMEARING_RANGE[1]]
    smearing = min(candidates, key=cost)
    return PMEParameters(smearing=smearing, mesh_spacing=2.0 * c * smearing, cutoff=s * smearing)


class ParameterCache:
    """LRU of Ewald/PME parameters keyed on (method, cell rounded to 0.01 Å, atom count, accuracy)."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, EwaldParameters | PMEParameters] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, method: str, cell: np.ndarray, n_atoms: int, accuracy: float) -> EwaldParameters | PMEParameters:
        key = (method, tuple(np.round(np.asarray(cell, dtype=float), _CELL_DECIMALS).ravel()), n_atoms, accuracy)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        # From the rounded cell, so that every cell sharing the key gets the same parameters.
        rounded = np.reshape(key[1], (3, 3))
        if method == "ewald":
            params: EwaldParameters | PMEParameters = ewald_parameters(rounded, n_atoms, accuracy)
        elif method == "pme":
            params = pme_parameters(rounded, n_atoms, accuracy)
        else:
            raise ValueError(f"no parameters for method {method!r}; expected 'ewald' or 'pme'")
        self._entries[key] = params
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return params

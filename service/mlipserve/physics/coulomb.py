"""Point-charge Coulomb kernels in float64, differentiable in a strained geometry: torch-pme's Ewald
and PME potentials for periodic cells and a dense pairwise sum for isolated systems, both with the
exclusion switch, and the geometry, neighbour-pair and autograd helpers the corrections share.

The Coulomb correction (``mlipserve.physics.electrostatics``) and QEq (``mlipserve.physics.qeq``)
both build on these kernels, so this module imports neither. torch-pme's own ``exclusion_radius``
zeroes the short-range part of every pair and damps only the long-range part, so its result is not
"full Coulomb minus the pairs inside r"; the switch is applied here in a Potential subclass instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchpme
from torch.utils.checkpoint import checkpoint
from vesin import NeighborList

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.tuning import EwaldParameters, PMEParameters
from mlipserve_client.types import Property, System

COULOMB = torchpme.prefactors.eV_A  # eV·Å/e²
# Below this many atoms Ewald beats PME on CPU here (benchmarks/corrections.py).
EWALD_MAX_ATOMS = 100
DTYPE = torch.float64
# Pairs per chunk of a dense pairwise sum (padded batch × rows × columns): ~100 MB of float64
# distance vectors, so a 10,000-atom cluster does not hold 10⁸ pairs in memory at once.
_DENSE_CHUNK_PAIRS = 1 << 22
_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


# --- geometry and autograd, shared by the corrections ------------------------------------------------


@dataclass(eq=False)
class Geometry:
    """One system's positions and cell as float64 tensors, strained by a zero displacement gradient
    ε so that autograd gives both forces (-dE/dr) and stress ((1/V) dE/dε): r' = r (1 + ε) and
    cell' = cell (1 + ε)."""

    positions: torch.Tensor  # (n, 3) leaf
    strain: torch.Tensor | None  # (3, 3) leaf, present when stress is wanted and there is a cell
    r: torch.Tensor  # (n, 3) strained positions
    cell: torch.Tensor | None  # (3, 3) strained cell, None without a cell
    volume: float  # Å³, 0 without a cell

    @classmethod
    def of(cls, system: System, *, forces: bool, stress: bool, device: torch.device) -> Geometry:
        positions = torch.tensor(system.positions, dtype=DTYPE, device=device).requires_grad_(forces)
        if system.cell is None:
            return cls(positions, None, positions, None, 0.0)
        cell = torch.tensor(system.cell, dtype=DTYPE, device=device)
        volume = abs(float(np.linalg.det(system.cell)))
        if not stress:
            return cls(positions, None, positions, cell, volume)
        strain = torch.zeros(3, 3, dtype=DTYPE, device=device, requires_grad=True)
        deformation = torch.eye(3, dtype=DTYPE, device=device) + strain
        return cls(positions, strain, positions @ deformation, cell @ deformation, volume)


def results_from_energies(
    energies: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    charges: Sequence[np.ndarray | None] | None = None,
) -> list[CorrectionResult]:
    """Forces and stress of each system by one backward pass over the sum of the energies (systems
    are independent, so each leaf receives only its own system's gradient)."""
    position_leaves = [g.positions for g in geometries if g.positions.requires_grad]
    strain_leaves = [g.strain for g in geometries if g.strain is not None]
    leaves = position_leaves + strain_leaves
    grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
    total = torch.stack([e.reshape(()) for e in energies]).sum()
    if leaves and total.requires_grad:
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    position_grads = iter(grads[: len(position_leaves)])
    strain_grads = iter(grads[len(position_leaves):])
    out = []
    for k, (energy, geometry) in enumerate(zip(energies, geometries)):
        result = CorrectionResult(energy=float(energy.detach()))
        if geometry.positions.requires_grad:
            result.forces = -_or_zeros(next(position_grads), geometry.positions)
        if geometry.strain is not None:
            virial = _or_zeros(next(strain_grads), geometry.strain)
            virial = 0.5 * (virial + virial.T) / geometry.volume
            result.stress = np.array([virial[a, b] for a, b in _VOIGT])
        if charges is not None and charges[k] is not None:
            result.charges = np.array(charges[k], dtype=np.float64)
        out.append(result)
    return out


def _or_zeros(grad: torch.Tensor | None, leaf: torch.Tensor) -> np.ndarray:
    """A gradient as numpy; zeros where the energy did not depend on the leaf (e.g. one atom)."""
    return (torch.zeros_like(leaf) if grad is None else grad).detach().cpu().numpy()


def wants(batch: Batch) -> tuple[bool, bool]:
    """(forces, stress) requested for the batch."""
    return Property.FORCES in batch.properties, Property.STRESS in batch.properties


def fully_periodic(system: System, index: int, what: str) -> bool:
    """True for a 3D-periodic system, False for an isolated one; slabs and wires are rejected."""
    if system.pbc.all():
        return True
    if system.pbc.any():
        raise InvalidSystemError(
            f"systems[{index}].pbc",
            f"{what} needs a system periodic along all three axes or none; this one is periodic along "
            f"{', '.join('abc'[a] for a in np.flatnonzero(system.pbc))} only (slabs are not supported yet)",
        )
    return False


# --- neighbour pairs ---------------------------------------------------------------------------------


PairList = tuple[np.ndarray, np.ndarray, np.ndarray]  # i, j, cell shifts


def pair_list(system: System, cutoff: float) -> PairList:
    """Half list of pairs (i, j, image shift) closer than ``cutoff``, self-images included."""
    box = system.cell if system.cell is not None else np.zeros((3, 3))
    return NeighborList(cutoff=cutoff, full_list=False).compute(
        system.positions, box, system.pbc.tolist(), quantities="ijS"
    )


def neighbour_pairs(system: System, geometry: Geometry, cutoff: float,
                    found: PairList | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Half list of pairs (i, j, image) closer than ``cutoff``, self-images included, as
    (indices (p, 2), distances (p,)); the distances are differentiable in the strained geometry.
    ``found``: that list, already computed (``pair_list``) for this system and cutoff."""
    i, j, shifts = found if found is not None else pair_list(system, cutoff)
    device = geometry.r.device
    i = torch.as_tensor(i.astype(np.int64), device=device)
    j = torch.as_tensor(j.astype(np.int64), device=device)
    vectors = geometry.r[j] - geometry.r[i]
    if geometry.cell is not None and len(shifts):
        vectors = vectors + torch.as_tensor(shifts, dtype=DTYPE, device=device) @ geometry.cell
    return torch.stack([i, j], dim=1), torch.linalg.norm(vectors, dim=1)


# --- the exclusion switch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exclusion:
    """Pairs closer than ``radius`` lose their bare Coulomb interaction, fully below
    ``radius - width`` and by a cosine switch across the last ``width`` Å (0: a sharp step)."""

    radius: float
    width: float = 1.0

    def weight(self, distance: torch.Tensor) -> torch.Tensor:
        if self.width <= 0.0:
            return (distance < self.radius).to(distance.dtype)
        start = self.radius - self.width
        phase = torch.clamp((distance - start) / self.width, 0.0, 1.0)
        return 0.5 * (1.0 + torch.cos(math.pi * phase))


class _ExcludedCoulomb(torchpme.CoulombPotential):
    """torch-pme's Coulomb potential with k w(r)/r taken off the short-range part of each pair: the
    k-space part is untouched, so the total is the full Coulomb energy minus the excluded pairs."""

    def __init__(self, smearing: float, exclusion: Exclusion | None) -> None:
        super().__init__(smearing=smearing, prefactor=COULOMB)
        self.exclusion = exclusion

    def sr_from_dist(self, dist: torch.Tensor, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
        short_range = super().sr_from_dist(dist, pair_mask)
        if self.exclusion is None:
            return short_range
        removed = self.prefactor * self.exclusion.weight(dist) / dist.clamp(min=1e-12)
        if pair_mask is not None:
            removed = removed * pair_mask
        return short_range - removed


# --- Coulomb kernels ---------------------------------------------------------------------------------


def periodic_potentials(
    charges: torch.Tensor,
    system: System,
    geometry: Geometry,
    params: EwaldParameters | PMEParameters,
    exclusion: Exclusion | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """torch-pme's per-atom potentials (n, channels) for ``charges`` (n, channels): the energy is
    Σ q·V (the ½ is inside), and for two charge sets x, y, 2 Σ x·V(y) is the bilinear form xᵀ A y.
    ``pairs`` (from ``neighbour_pairs``) may reach beyond the parameters' cutoff: more real-space
    pairs only add accuracy."""
    if pairs is None:
        pairs = neighbour_pairs(system, geometry, max(params.cutoff, exclusion.radius if exclusion else 0.0))
    calculator = _calculator(params, exclusion).to(device=geometry.r.device, dtype=DTYPE)
    return calculator(charges, geometry.cell, geometry.r, *pairs)


def _calculator(params: EwaldParameters | PMEParameters, exclusion: Exclusion | None) -> torchpme.Calculator:
    potential = _ExcludedCoulomb(params.smearing, exclusion)
    if isinstance(params, PMEParameters):
        return torchpme.PMECalculator(potential, mesh_spacing=params.mesh_spacing,
                                      interpolation_nodes=params.interpolation_nodes)
    return torchpme.EwaldCalculator(potential, lr_wavelength=params.lr_wavelength)


def dense_pair_sums(
    r: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    kernel: Callable[[torch.Tensor, slice], torch.Tensor],
) -> torch.Tensor:
    """Σ_{i≠j} x_i y_j kernel(r_ij) for each system of a padded batch: r (B, n, 3), x, y (B, n),
    mask (B, n) marking real atoms; kernel(distances (B, c, n), rows) for a chunk of rows.

    Rows are taken in chunks of at most _DENSE_CHUNK_PAIRS pairs, each under activation checkpointing
    when there are several, so memory stays bounded for large clusters (the chunk is recomputed in
    the backward pass)."""
    n_systems, n = mask.shape
    rows_per_chunk = max(1, _DENSE_CHUNK_PAIRS // max(1, n_systems * n))
    chunks = [slice(start, min(start + rows_per_chunk, n)) for start in range(0, n, rows_per_chunk)]
    total = r.new_zeros(n_systems)
    for rows in chunks:
        def chunk_sum(r_: torch.Tensor, x_: torch.Tensor, y_: torch.Tensor, rows: slice = rows) -> torch.Tensor:
            vectors = r_[:, rows, None, :] - r_[:, None, :, :]
            index = torch.arange(n, device=r_.device)
            pair = mask[:, rows, None] & mask[:, None, :] & (index[rows, None] != index[None, :])
            # Unit distance where there is no pair, so that sqrt never sees 0 (NaN gradients).
            distances = torch.sqrt(torch.where(pair, (vectors * vectors).sum(-1), 1.0))
            values = torch.where(pair, kernel(distances, rows), 0.0)
            return torch.einsum("bi,bij,bj->b", x_[:, rows], values, y_)

        if len(chunks) > 1 and torch.is_grad_enabled():
            total = total + checkpoint(chunk_sum, r, x, y, use_reentrant=False)
        else:
            total = total + chunk_sum(r, x, y)
    return total


def pad(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)

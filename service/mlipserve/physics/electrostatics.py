"""Long-range electrostatics of point charges: PME or Ewald (torch-pme 0.5) for periodic cells, a
direct pairwise sum for isolated systems, in float64, with forces and stress by autograd.

Energy (eV): E = Σ_{i<j, images} k q_i q_j [1 - w(r_ij)] / r_ij, k = 14.3996 eV·Å/e² (torch-pme's
``prefactors.eV_A``), where w is the exclusion switch: w = 1 below ``exclusion_radius - exclusion_width``,
a cosine down to 0 at ``exclusion_radius``, and 0 beyond (width 0: a sharp step). It removes the
Coulomb interaction of pairs that the model already describes within its cutoff, smoothly by
default so that energies stay continuous when pairs cross the radius. (torch-pme's own
``exclusion_radius`` instead zeroes the short-range part of every pair and damps only the long-range
part, so its result is not "full Coulomb minus the pairs inside r"; the switch is applied here in a
Potential subclass instead.)

Periodic cells (all three axes) use torch-pme's convention: a charged cell is neutralised by a
uniform background, E_bg = -π σ² k Q² / V (σ: torch-pme's smearing, α = 1/(√2 σ) in the usual Ewald
notation: -π Q²/(2 V α²)), which torch-pme already adds (``background_correction``). Slabs and wires
are rejected: torch-pme 0.5's 2D correction assumes the vacuum axis is a Cartesian axis and a vacuum
gap several times the slab thickness, which requests do not guarantee. Method "auto" uses Ewald below
``ewald_max_atoms`` atoms and PME (6 interpolation nodes) above; parameters come from
``mlipserve.physics.tuning`` (analytic, cached per cell shape), never from torch-pme's tuners.

Charges: "request" (``System.atomic_charges``, summing to ``total_charge``), "model" (the charges
a model predicted, passed by the caller) or "qeq" (``mlipserve.physics.qeq.QEq``; forces then include
the response of the charges to the positions, by the adjoint of the QEq equations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchpme
from torch.utils.checkpoint import checkpoint
from vesin import NeighborList

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.tuning import EwaldParameters, ParameterCache, PMEParameters
from mlipserve_client.types import Property, System

if TYPE_CHECKING:
    from mlipserve.physics.qeq import QEq, QEqSolution

COULOMB = torchpme.prefactors.eV_A  # eV·Å/e²
METHODS = ("auto", "pme", "ewald", "direct")
CHARGE_SOURCES = ("request", "model", "qeq")
# Below this many atoms Ewald beats PME on CPU here (benchmarks/corrections.py).
EWALD_MAX_ATOMS = 100
CHARGE_SUM_TOLERANCE = 1e-6  # e
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


# --- the correction ------------------------------------------------------------------------------------


class Electrostatics:
    """Coulomb energy of atomic point charges, as a Correction.

    charges: "request" | "model" | "qeq" (module docstring). method: "auto" | "pme" | "ewald" |
    "direct" for periodic systems ("direct" accepts isolated systems only); isolated systems always
    use the direct sum. exclusion_radius: the model's cutoff (Å) to avoid counting the model's own
    short range twice; None or 0 disables. exclusion_width: the switch width (Å), 0 for a sharp cut.
    accuracy: target relative error of periodic energies (tuning).
    """

    def __init__(
        self,
        charges: str = "request",
        method: str = "auto",
        exclusion_radius: float | None = None,
        exclusion_width: float = 1.0,
        accuracy: float = 1e-6,
        ewald_max_atoms: int = EWALD_MAX_ATOMS,
        qeq: QEq | None = None,
        device: str = "cpu",
    ) -> None:
        if charges not in CHARGE_SOURCES:
            raise ValueError(f"charges must be one of {', '.join(CHARGE_SOURCES)}; got {charges!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if exclusion_radius is not None and exclusion_radius < 0:
            raise ValueError(f"exclusion_radius must be >= 0, got {exclusion_radius}")
        if exclusion_width < 0 or (exclusion_radius and exclusion_width > exclusion_radius):
            raise ValueError(f"exclusion_width must be in [0, exclusion_radius], got {exclusion_width}")
        self.charges = charges
        self.method = method
        self.exclusion = Exclusion(exclusion_radius, exclusion_width) if exclusion_radius else None
        self.accuracy = accuracy
        self.ewald_max_atoms = ewald_max_atoms
        self.device = torch.device(device)
        self.parameters = ParameterCache()
        if charges == "qeq" and qeq is None:
            # Imported here: qeq builds its interaction on this module's kernels.
            from mlipserve.physics.qeq import QEq

            qeq = QEq(accuracy=accuracy, ewald_max_atoms=ewald_max_atoms, device=device)
        self.qeq = qeq

    @property
    def name(self) -> str:
        return "coulomb" if self.charges == "request" else f"coulomb({self.charges})"

    def periodic_method(self, n_atoms: int) -> str:
        if self.method == "auto":
            return "ewald" if n_atoms < self.ewald_max_atoms else "pme"
        return self.method

    def parameters_for(self, system: System) -> EwaldParameters | PMEParameters:
        return self.parameters.get(self.periodic_method(system.n_atoms), system.cell, system.n_atoms, self.accuracy)

    def compute(self, batch: Batch, model_charges: Sequence[np.ndarray | None] | None = None) -> list[CorrectionResult]:
        want_forces, want_stress = wants(batch)
        systems = batch.systems
        periodic = [self._periodic(system, i) for i, system in enumerate(systems)]
        if model_charges is not None and len(model_charges) != len(systems):
            raise ValueError(f"model_charges has {len(model_charges)} entries for {len(systems)} systems")
        solutions = self.qeq.solve(systems) if self.charges == "qeq" else None
        charges = [self._charges(i, system, model_charges, solutions) for i, system in enumerate(systems)]
        geometries = [
            Geometry.of(s, forces=want_forces, stress=want_stress and s.cell is not None, device=self.device)
            for s in systems
        ]
        respond = solutions is not None and (want_forces or want_stress)
        q = [torch.tensor(c, dtype=DTYPE, device=self.device).requires_grad_(respond) for c in charges]

        energies: list[torch.Tensor | None] = [None] * len(systems)
        for i in np.flatnonzero(periodic):
            params = self.parameters_for(systems[i])
            potentials = periodic_potentials(q[i][:, None], systems[i], geometries[i], params, self.exclusion)
            energies[i] = (q[i][:, None] * potentials).sum()
        isolated = [i for i, p in enumerate(periodic) if not p]
        if isolated:
            direct = self._direct([q[i] for i in isolated], [geometries[i] for i in isolated])
            for i, energy in zip(isolated, direct):
                energies[i] = energy
        if respond:
            energies = [self._with_charge_response(s, g, qi, e, solution)
                        for s, g, qi, e, solution in zip(systems, geometries, q, energies, solutions)]
        if solutions is not None:
            self.qeq.release_pairs()
        return results_from_energies(energies, geometries, charges)

    def _periodic(self, system: System, index: int) -> bool:
        periodic = fully_periodic(system, index, "the Coulomb correction")
        if periodic and self.method == "direct":
            raise InvalidSystemError(
                f"systems[{index}].pbc",
                "method 'direct' sums pairs of an isolated system; a periodic one needs 'ewald', 'pme' or 'auto'",
            )
        return periodic

    def _charges(self, index: int, system: System, model_charges, solutions) -> np.ndarray:
        if self.charges == "qeq":
            return solutions[index].charges
        if self.charges == "model":
            found = None if model_charges is None else model_charges[index]
            if found is None:
                raise ValueError(f"systems[{index}]: charges='model' but the model returned no atomic charges")
            found = np.asarray(found, dtype=np.float64)
            if found.shape != (system.n_atoms,):
                raise ValueError(
                    f"systems[{index}]: model charges have shape {found.shape}, expected ({system.n_atoms},)"
                )
            return found
        field = f"systems[{index}].atomic_charges"
        if system.atomic_charges is None:
            raise InvalidSystemError(field, "the Coulomb correction with charges='request' needs per-atom charges")
        found = np.asarray(system.atomic_charges, dtype=np.float64)
        if found.shape != (system.n_atoms,):
            raise InvalidSystemError(field, f"has shape {found.shape}, expected ({system.n_atoms},)")
        total = float(found.sum())
        if abs(total - system.total_charge) > CHARGE_SUM_TOLERANCE:
            raise InvalidSystemError(
                field, f"sum to {total:.8g} e but total_charge is {system.total_charge:.8g} e "
                f"(they must agree within {CHARGE_SUM_TOLERANCE:g} e)",
            )
        return found

    def _direct(self, charges: Sequence[torch.Tensor], geometries: Sequence[Geometry]) -> list[torch.Tensor]:
        """½ Σ_{i≠j} k q_i q_j (1 - w(r_ij)) / r_ij for isolated systems, as one padded batch."""
        exclusion = self.exclusion
        mask = pad([torch.ones(len(c), dtype=torch.bool, device=self.device) for c in charges])
        q = pad(charges)

        def kernel(distances: torch.Tensor, rows: slice) -> torch.Tensor:
            bare = COULOMB / distances
            return bare if exclusion is None else bare * (1.0 - exclusion.weight(distances))

        sums = dense_pair_sums(pad([g.r for g in geometries]), q, q, mask, kernel)
        return list(0.5 * sums)

    def _with_charge_response(
        self, system: System, geometry: Geometry, q: torch.Tensor, energy: torch.Tensor, solution: QEqSolution
    ) -> torch.Tensor:
        """The energy with a term whose value is 0 and whose gradient is the charges' response:
        dE/dr = ∂E/∂r|_q - λᵀ (∂H/∂r) q, with H λ = ∂E/∂q on the constrained space (QEq's
        Lagrangian: H q = -χ + μ, Σq = Q)."""
        if not energy.requires_grad:  # a lone atom: no pairs, nothing depends on the charges
            return energy
        (gradient,) = torch.autograd.grad(energy, q, retain_graph=True, allow_unused=True)
        if gradient is None:
            return energy
        multipliers = solution.adjoint(gradient.detach())
        response = self.qeq.interaction(system, geometry, multipliers, q.detach())
        return energy - (response - response.detach())

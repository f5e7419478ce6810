"""QEq charge equilibration (Rappé & Goddard, J. Phys. Chem. 95, 3358 (1991)) with Gaussian charges,
periodic (Ewald-consistent) or isolated, solved per system with the total-charge constraint.

Energy (eV) of charges q (e), minimised under Σ q = Q (a Lagrange multiplier μ):

    E(q) = Σ χ_i q_i + ½ qᵀ H q,   H_ii = J_i,   H_ij = k erf(r_ij / γ_ij) / r_ij,
    γ_ij = sqrt(2 (σ_i² + σ_j²)),   σ_i = k / (√π J_i),   k = 14.3996 eV·Å/e²

χ (electronegativity) and J (idempotential, i.e. hardness ×2) are Rappé & Goddard's. Each charge is
a spherical Gaussian (density ∝ exp(-r²/2σ²)) whose self-Coulomb energy is J_i, so that H is the
exact Coulomb matrix of those Gaussians: finite as r → 0 and k/r at long range, the shielding the
original paper gets from Slater-orbital integrals. Gaussians replace those (as in Gaussian-charge
QEq variants) because their periodic sums split exactly into Ewald plus a short-range erfc term.
H is then positive definite, and the solve is a Cholesky factorisation:
q = x + u (Q - Σx)/(Σu) with H x = -χ, H u = 1.

Periodic cells (all three axes): H_ij = Σ over images of the Gaussians' interaction, with a
neutralising background (the k = 0 term dropped), built as torch-pme's point-charge Ewald matrix
(same kernels, self and background terms), minus k erfc(r/γ_ij)/r over images within the range where
erfc is above the accuracy, plus the background of the Gaussians' spread, 2πk(σ_i² + σ_j²)/V. This
equals (4πk/V) Σ_{k≠0} exp(-k²(σ_i²+σ_j²)/2) cos(k·r_ij)/k² (checked in the tests) to the Ewald
accuracy (default 1e-6 relative, ~1e-8 in practice).

These are the Gaussian widths of Open Babel's QEq (the radii in its qeq.txt are √2 σ). Known
behaviour, of the model rather than of this implementation: such compact Gaussians screen little,
and QEq's charges come out large for ionic solids (equilibrium rocksalt NaCl ±6.4 e, MgO ±3.6 e,
water's O -1.72 e): in rocksalt the Madelung field nearly cancels the hardness J_Na + J_Cl. Use QEq
charges in crystals with care. Diffuser charges give smaller ones (Gaussians matched to the second
moment of Rappé-Goddard's Slater orbitals, from their radii R, gave NaCl ±1.2 e and water's O
-0.84 e in a trial here), at the price of H no longer being a Gaussian Coulomb matrix.

The dense solve costs O(n³) (and the periodic matrix O(n² K) with K k-vectors), so systems are
limited to ``max_atoms``. The energy and forces of the QEq model itself (``QEqCorrection``) use the
Hellmann-Feynman theorem: E is stationary in q on the constraint, so dE/dr is taken at fixed q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchpme
from ase.data import chemical_symbols
from torchpme.lib import generate_kvectors_for_ewald

from mlipserve.backends.base import Batch
from mlipserve.errors import SystemTooLargeError, UnsupportedElementError
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.electrostatics import (
    COULOMB,
    DTYPE,
    EWALD_MAX_ATOMS,
    Geometry,
    dense_pair_sums,
    fully_periodic,
    neighbour_pairs,
    periodic_potentials,
    results_from_energies,
    wants,
)
from mlipserve.physics.tuning import EwaldParameters, ParameterCache
from mlipserve_client.types import System

# (χ, J) in eV. Rappé & Goddard, J. Phys. Chem. 95, 3358 (1991), Table I (idempotential J = 2η);
# the same values, with those the 1991 table lacks, are UFF's "Xi" and 2 × "Hard" (Rappé et al.,
# J. Am. Chem. Soc. 114, 10024 (1992), Table 1), which Open Babel's qeq.txt also lists.
RAPPE_GODDARD: dict[int, tuple[float, float]] = {
    1: (4.528, 13.890),  # H
    3: (3.006, 4.772),  # Li
    4: (4.877, 8.886),  # Be
    5: (5.110, 9.500),  # B
    6: (5.343, 10.126),  # C
    7: (6.899, 11.760),  # N
    8: (8.741, 13.364),  # O
    9: (10.874, 14.948),  # F
    11: (2.843, 4.592),  # Na
    12: (3.951, 7.386),  # Mg
    13: (4.060, 7.180),  # Al
    14: (4.168, 6.974),  # Si
    15: (5.463, 8.000),  # P
    16: (6.928, 8.972),  # S
    17: (8.564, 9.892),  # Cl
    19: (2.421, 3.840),  # K
    20: (3.231, 5.760),  # Ca
    21: (3.395, 6.160),  # Sc
    22: (3.470, 6.760),  # Ti
    23: (3.650, 6.820),  # V
    24: (3.415, 7.730),  # Cr
    25: (3.325, 8.210),  # Mn
    26: (3.760, 8.280),  # Fe
    27: (4.105, 8.350),  # Co
    28: (4.465, 8.410),  # Ni
    29: (4.200, 8.440),  # Cu
    30: (5.106, 8.570),  # Zn
    31: (3.641, 6.320),  # Ga
    32: (4.051, 6.876),  # Ge
    33: (5.188, 7.618),  # As
    34: (6.428, 8.262),  # Se
    35: (7.790, 8.850),  # Br
    37: (2.331, 3.692),  # Rb
    38: (3.024, 4.880),  # Sr
    39: (3.830, 5.620),  # Y
    40: (3.400, 7.100),  # Zr
    41: (3.550, 6.760),  # Nb
    42: (3.465, 7.510),  # Mo
    46: (4.320, 8.000),  # Pd
    47: (4.436, 6.268),  # Ag
    48: (5.034, 7.914),  # Cd
    49: (3.506, 5.792),  # In
    50: (3.987, 6.248),  # Sn
    51: (4.899, 6.684),  # Sb
    52: (5.816, 7.052),  # Te
    53: (6.822, 7.524),  # I
    55: (2.183, 3.422),  # Cs
    56: (2.814, 4.792),  # Ba
    72: (3.700, 6.800),  # Hf
    73: (5.100, 5.700),  # Ta
    74: (4.630, 6.620),  # W
    78: (4.790, 8.860),  # Pt
    79: (4.894, 5.172),  # Au
    82: (3.900, 7.060),  # Pb
    83: (4.690, 7.480),  # Bi
}
# A dense n×n solve: 3,000 atoms is ~70 MB per matrix and seconds of CPU (benchmarks/corrections.py).
MAX_ATOMS = 3000
# k-vectors per chunk of the periodic matrix's reciprocal sum, times atoms: bounds the cos/sin tables.
_KSPACE_CHUNK = 1 << 22


class QEqTooLargeError(SystemTooLargeError):
    """A system with more atoms than QEq's dense solve takes (``QEq.max_atoms``)."""

    def __init__(self, field: str, n_atoms: int, limit: int) -> None:
        super().__init__(field, n_atoms, limit)
        self.args = (f"{field}: QEq solves densely (O(n³)); {n_atoms} atoms is more than its limit of {limit}",)


@dataclass(eq=False)
class QEqSolution:
    """One system's equilibrated charges, with the factorised H for the adjoint (response) solve."""

    charges: np.ndarray  # (n,) e
    factor: torch.Tensor  # Cholesky factor of H
    unit_response: torch.Tensor  # H⁻¹ 1

    def adjoint(self, gradient: torch.Tensor) -> torch.Tensor:
        """λ with H λ = g - ν 1 and Σ λ = 0: the multipliers of dE/dq for the charges' response."""
        h = torch.cholesky_solve(gradient.reshape(-1, 1), self.factor)[:, 0]
        u = self.unit_response
        return h - u * (h.sum() / u.sum())


@dataclass(frozen=True)
class _Species:
    chi: torch.Tensor  # (n,) eV
    hardness: torch.Tensor  # (n,) eV
    sigma: torch.Tensor  # (n,) Å


class QEq:
    """QEq charges for a batch of systems (module docstring). ``accuracy``: relative error of the
    periodic sums (Ewald for the matrix; Ewald or PME for energies, as Electrostatics chooses)."""

    def __init__(self, accuracy: float = 1e-6, max_atoms: int = MAX_ATOMS, ewald_max_atoms: int = EWALD_MAX_ATOMS,
                 device: str = "cpu") -> None:
        self.accuracy = accuracy
        self.max_atoms = max_atoms
        self.ewald_max_atoms = ewald_max_atoms
        self.device = torch.device(device)
        self.parameters = ParameterCache()

    def charges(self, systems: Sequence[System]) -> list[np.ndarray]:
        return [solution.charges for solution in self.solve(systems)]

    def solve(self, systems: Sequence[System]) -> list[QEqSolution]:
        return [self._solve(i, system) for i, system in enumerate(systems)]

    def species(self, system: System, index: int) -> _Species:
        known = np.isin(system.numbers, list(RAPPE_GODDARD))
        if not known.all():
            atoms = np.flatnonzero(~known)
            elements = sorted({chemical_symbols[z] for z in system.numbers[atoms]})
            shown = ", ".join(map(str, atoms[:20])) + (" ..." if len(atoms) > 20 else "")
            raise UnsupportedElementError(
                f"systems[{index}].atomic_numbers[{atoms[0]}]",
                f"QEq has no Rappé-Goddard parameters for {', '.join(elements)} (atoms {shown}); it covers "
                f"{', '.join(chemical_symbols[z] for z in RAPPE_GODDARD)}",
            )
        table = np.array([RAPPE_GODDARD[int(z)] for z in system.numbers])
        chi = torch.tensor(table[:, 0], dtype=DTYPE, device=self.device)
        hardness = torch.tensor(table[:, 1], dtype=DTYPE, device=self.device)
        return _Species(chi, hardness, COULOMB / (math.sqrt(math.pi) * hardness))

    def matrix(self, system: System, index: int = 0) -> torch.Tensor:
        """H (n, n) in eV/e² at the system's geometry (no gradient)."""
        species = self.species(system, index)
        with torch.no_grad():
            if fully_periodic(system, index, "QEq"):
                return self._periodic_matrix(system, species)
            return self._isolated_matrix(system, species)

    def interaction(self, system: System, geometry: Geometry, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """xᵀ H(r) y, differentiable in the (strained) geometry."""
        species = self.species(system, 0)
        onsite = (species.hardness * x * y).sum()
        if not system.pbc.any():
            mask = torch.ones(1, system.n_atoms, dtype=torch.bool, device=self.device)
            sigma = species.sigma[None]

            def kernel(distances: torch.Tensor, rows: slice) -> torch.Tensor:
                gamma = torch.sqrt(2.0 * (sigma[:, rows, None] ** 2 + sigma[:, None, :] ** 2))
                return COULOMB * torch.erf(distances / gamma) / distances

            return onsite + dense_pair_sums(geometry.r[None], x[None], y[None], mask, kernel)[0]
        params = self.parameters.get("ewald" if system.n_atoms < self.ewald_max_atoms else "pme", system.cell,
                                     system.n_atoms, self.accuracy)
        pairs, distances = neighbour_pairs(system, geometry, max(params.cutoff, self._shield_cutoff(species)))
        potentials = periodic_potentials(y[:, None], system, geometry, params, pairs=(pairs, distances))
        point = 2.0 * (x[:, None] * potentials).sum()
        i, j = pairs[:, 0], pairs[:, 1]
        gamma = torch.sqrt(2.0 * (species.sigma[i] ** 2 + species.sigma[j] ** 2))
        screened = (COULOMB * torch.erfc(distances / gamma) / distances * (x[i] * y[j] + x[j] * y[i])).sum()
        volume = torch.linalg.det(geometry.cell).abs()
        s2 = species.sigma**2
        spread = 2.0 * math.pi * COULOMB / volume * ((x * s2).sum() * y.sum() + x.sum() * (y * s2).sum())
        return onsite + point - screened + spread

    def _solve(self, index: int, system: System) -> QEqSolution:
        if system.n_atoms > self.max_atoms:
            raise QEqTooLargeError(f"systems[{index}]", system.n_atoms, self.max_atoms)
        species = self.species(system, index)
        hardness_matrix = self.matrix(system, index)
        factor, info = torch.linalg.cholesky_ex(hardness_matrix)
        if int(info) != 0:
            # H is a Coulomb matrix of Gaussians, positive definite: failing means broken geometry.
            raise ValueError(f"systems[{index}]: the QEq matrix is not positive definite (atoms overlapping?)")
        rhs = torch.stack([-species.chi, torch.ones_like(species.chi)], dim=1)
        solved = torch.cholesky_solve(rhs, factor)
        x, u = solved[:, 0], solved[:, 1]
        charges = x + u * ((system.total_charge - x.sum()) / u.sum())
        return QEqSolution(charges=charges.cpu().numpy(), factor=factor, unit_response=u)

    def _shield_cutoff(self, species: _Species) -> float:
        """Distance beyond which erfc(r/γ)/r of the widest pair is below the accuracy (relative to 1/r)."""
        x = float(torch.special.erfinv(torch.tensor(1.0 - self.accuracy / 10.0, dtype=DTYPE)))
        return x * 2.0 * float(species.sigma.max())

    def _isolated_matrix(self, system: System, species: _Species) -> torch.Tensor:
        r = torch.tensor(system.positions, dtype=DTYPE, device=self.device)
        # Unit distance on the diagonal (replaced by J) keeps 0/0 out.
        distances = torch.cdist(r, r).fill_diagonal_(1.0)
        gamma = torch.sqrt(2.0 * (species.sigma[:, None] ** 2 + species.sigma[None, :] ** 2))
        matrix = COULOMB * torch.erf(distances / gamma) / distances
        matrix.diagonal().copy_(species.hardness)
        return matrix

    def _periodic_matrix(self, system: System, species: _Species) -> torch.Tensor:
        params: EwaldParameters = self.parameters.get("ewald", system.cell, system.n_atoms, self.accuracy)
        geometry = Geometry.of(system, forces=False, stress=False, device=self.device)
        n = system.n_atoms
        potential = torchpme.CoulombPotential(smearing=params.smearing, prefactor=COULOMB).to(DTYPE)
        pairs, distances = neighbour_pairs(system, geometry, max(params.cutoff, self._shield_cutoff(species)))
        i, j = pairs[:, 0], pairs[:, 1]
        gamma = torch.sqrt(2.0 * (species.sigma[i] ** 2 + species.sigma[j] ** 2))
        pair = potential.sr_from_dist(distances) - COULOMB * torch.erfc(distances / gamma) / distances
        matrix = torch.zeros(n, n, dtype=DTYPE, device=self.device)
        matrix.index_put_((i, j), pair, accumulate=True)
        matrix.index_put_((j, i), pair, accumulate=True)
        self._add_reciprocal(matrix, geometry, potential, params)
        volume = geometry.volume
        matrix.diagonal().sub_(potential.self_contribution())
        matrix.sub_(2.0 * potential.background_correction() / volume)
        matrix.diagonal().add_(species.hardness)
        s2 = species.sigma**2
        matrix.add_(2.0 * math.pi * COULOMB / volume * (s2[:, None] + s2[None, :]))
        return matrix

    def _add_reciprocal(self, matrix: torch.Tensor, geometry: Geometry, potential, params: EwaldParameters) -> None:
        """(1/V) Σ_k G(k) cos(k·(r_i - r_j)) over the same k box as torch-pme's EwaldCalculator, using
        one of each ±k pair (the sum is even in k) with twice the weight."""
        cell = geometry.cell
        ns = torch.ceil(torch.linalg.norm(cell, dim=1) / params.lr_wavelength).long()
        kvectors = generate_kvectors_for_ewald(cell=cell, ns=ns)
        integers = torch.round(kvectors @ cell.T / (2.0 * math.pi)).long()
        # The first non-zero of (n1, n2, n3) is positive for exactly one of k and -k.
        first = torch.where(integers[:, 1] != 0, integers[:, 1], integers[:, 2])
        first = torch.where(integers[:, 0] != 0, integers[:, 0], first)
        kvectors = kvectors[first > 0]
        weights = 2.0 * potential.lr_from_k_sq((kvectors**2).sum(dim=1)) / geometry.volume
        step = max(1, _KSPACE_CHUNK // max(1, matrix.shape[0]))
        for start in range(0, len(kvectors), step):
            phase = geometry.r @ kvectors[start:start + step].T
            w = weights[start:start + step]
            cos, sin = torch.cos(phase), torch.sin(phase)
            matrix.addmm_(cos * w, cos.T).addmm_(sin * w, sin.T)


class QEqCorrection:
    """The QEq model's own energy relative to neutral atoms, E = χ·q + ½ qᵀ H q at the equilibrated
    charges, with forces and stress at fixed charges (exact, E being stationary in q)."""

    def __init__(self, qeq: QEq | None = None) -> None:
        self.qeq = qeq if qeq is not None else QEq()

    @property
    def name(self) -> str:
        return "qeq"

    def compute(self, batch: Batch, model_charges=None) -> list[CorrectionResult]:
        want_forces, want_stress = wants(batch)
        solutions = self.qeq.solve(batch.systems)
        geometries, energies = [], []
        for i, (system, solution) in enumerate(zip(batch.systems, solutions)):
            geometry = Geometry.of(system, forces=want_forces, stress=want_stress and system.cell is not None,
                                   device=self.qeq.device)
            q = torch.tensor(solution.charges, dtype=DTYPE, device=self.qeq.device)
            species = self.qeq.species(system, i)
            energies.append((species.chi * q).sum() + 0.5 * self.qeq.interaction(system, geometry, q, q))
            geometries.append(geometry)
        return results_from_energies(energies, geometries, [s.charges for s in solutions])

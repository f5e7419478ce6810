"""QEq charge equilibration of Rappé & Goddard (J. Phys. Chem. 95, 3358 (1991)) with their
Slater-orbital shielding, periodic (Ewald-consistent) or isolated, solved per system under the
total-charge constraint.

Energy (eV) of charges q (e), made stationary under Σ q = Q (a Lagrange multiplier μ):

    E(q) = Σ χ_i q_i + ½ qᵀ H q,   H_ii = J_i,   H_ij = J_ij(r_ij) = k ∫∫ |φ_i(r)|² |φ_j(r')|² / |r - r'|

with k = 14.3996 eV·Å/e². φ_i is a normalised ns Slater orbital r^(n-1) exp(-ζ_i r), n the principal
quantum number of the atom's valence shell (1 for H, 2 for Li-F, ..., 6 for Cs-Bi) and
ζ_i = λ (2 n_i + 1) / (2 R_i), λ = 0.4913, R_i the atom's QEq radius: the orbital density's mean
radius (2n+1)/(2ζ) is R_i/λ. So J_ij(r) is the Coulomb energy of two unit charges spread as the two
orbitals' densities: finite at r → 0, k/r at long range (the difference decays as exp(-2ζ r)).
χ (electronegativity), J (idempotential, i.e. hardness ×2) and R are Rappé & Goddard's
(``RAPPE_GODDARD``).

J_ij comes from ``mlipserve.physics.slater``: exact, in closed form, interpolated from a table per
element pair, and taken as k/r beyond a range set per element pair, where
|J_ij(r) - k/r| < (accuracy/10) k/r.

Positive definiteness. The Coulomb matrix of the Slater densities, with their own self-energies
J^S_i = J_ii(0) on the diagonal, is positive definite; H puts Rappé & Goddard's J_i there instead.
J_i > J^S_i for every element of the table except hydrogen (J_H = 13.89 eV against
J^S_H = (5/8) k ζ_H = 17.88 eV), so H is positive definite unless two hydrogens are closer than
0.773 Å, where J_HH(r) > J_H (H₂ itself, 0.74 Å, is such a case). The solve is a Cholesky
factorisation, q = x + u (Q - Σx)/(Σu) with H x = -χ, H u = 1. Where it fails (or a pivot is below
1e-10 of the largest), the bordered Lagrange system [[H, 1], [1ᵀ, 0]] [q; -μ] = [-χ; Q] is solved
instead by an LU factorisation with partial pivoting (what torch.linalg.solve does, the factors
kept for the adjoint solve of the forces): the charges are then E's stationary point on the
constraint, a saddle rather than a minimum where H is indefinite there. Where that system is
singular too (no unique charges), the system is refused with an InvalidSystemError naming it and
its closest atoms.

Left out of Rappé & Goddard's model: hydrogen's charge-dependent hardness, J_H(q) = J_H (1 + q/ζ⁰_H)
with ζ⁰_H = 1.0698 bohr⁻¹, which makes the equations nonlinear (the paper iterates them to
self-consistency), makes E non-convex for hydridic hydrogen (q_H < -0.53 e) and unbounded below,
and would take away the linear response that the forces use. Hydrogens come out more positive
without it: water's O is -0.91 e here and -0.63 e with that iteration (J_H rising to 18.0 eV at
q_H = +0.32 e); methane's C -0.61 e against -0.47 e.

Charges (ASE's molecule geometries): water O -0.91 e, H +0.45 e; methane C -0.61 e, H +0.15 e;
ethanol O -0.78 e, H(O) +0.50 e, C(H₂) -0.19 e, C(H₃) -0.39 e, H(C) +0.08 to +0.21 e. NaCl
molecule (2.361 Å) ±0.766 e, as cheq's tests list it. Rocksalt NaCl (a = 5.64 Å) ±1.145 e (the
centre of an isolated 14×14×14-ion cube: ±1.144 e), MgO (a = 4.212 Å) ±0.685 e: in crystals the
Madelung field, shielded at the nearest neighbours, lifts the alkali halides above their molecules'
charges.

Periodic cells (all three axes): H_ij = Σ over images of the two densities' interaction, with a
neutralising background (the k = 0 term dropped), built as torch-pme's point-charge Ewald matrix
(same kernels, self and background terms), plus the shielding f_ij(r) = J_ij(r) - k/r over images
within each element pair's range above, plus the background term of the densities' spread,
(2πk / 3V)(⟨r²⟩_i + ⟨r²⟩_j) with ⟨r²⟩ = (2n+2)(2n+1)/(4ζ²) (it is -f̂_ij(k=0)/V). This equals
(4πk/V) Σ_{k≠0} ρ̂_i(k) ρ̂_j(k) cos(k·r_ij)/k², ρ̂ the densities' form factors, plus J_i - J^S_i on the
diagonal (checked in the tests), to the Ewald accuracy (default 1e-6 relative).

The dense solve costs O(n³) (and the periodic matrix O(n² K) with K k-vectors), so systems are
limited to ``max_atoms``.
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
from vesin import NeighborList

from mlipserve.errors import InvalidSystemError, SystemTooLargeError, UnsupportedElementError
from mlipserve.physics.coulomb import (
    COULOMB,
    DTYPE,
    EWALD_MAX_ATOMS,
    Geometry,
    PairList,
    dense_pair_sums,
    fully_periodic,
    neighbour_pairs,
    pair_list,
    periodic_potentials,
)
from mlipserve.physics.qeq_parameters import RAPPE_GODDARD, principal_quantum_number, slater_exponent
from mlipserve.physics.slater import _ShieldingTable
from mlipserve.physics.tuning import EwaldParameters, ParameterCache
from mlipserve_client.types import System

# A dense n×n solve: 3,000 atoms is ~70 MB per matrix and seconds of CPU (benchmarks/corrections.py).
MAX_ATOMS = 3000
# k-vectors per chunk of the periodic matrix's reciprocal sum, times atoms: bounds the cos/sin tables.
_KSPACE_CHUNK = 1 << 22
# Cholesky (squared) or LU pivots below this fraction of the largest: the matrix counts as singular.
_SINGULAR_PIVOT = 1e-10


class QEqTooLargeError(SystemTooLargeError):
    """A system with more atoms than QEq's dense solve takes (``QEq.max_atoms``)."""

    def __init__(self, field: str, n_atoms: int, limit: int) -> None:
        super().__init__(field, n_atoms, limit)
        self.args = (f"{field}: QEq solves densely (O(n³)); {n_atoms} atoms is more than its limit of {limit}",)


@dataclass(eq=False)
class QEqSolution:
    """One system's equilibrated charges, with the factorised matrix for the adjoint (response) solve:
    the Cholesky factor of H and H⁻¹1, or (where H is not positive definite) the LU factors of the
    bordered Lagrange matrix [[H, 1], [1ᵀ, 0]]."""

    charges: np.ndarray  # (n,) e
    factor: torch.Tensor  # Cholesky factor of H, or LU factors of the bordered matrix
    unit_response: torch.Tensor | None  # H⁻¹ 1 (Cholesky); None with LU factors
    pivots: torch.Tensor | None = None  # LU pivots; None with a Cholesky factor

    def adjoint(self, gradient: torch.Tensor) -> torch.Tensor:
        """λ with H λ = g - ν 1 and Σ λ = 0: the multipliers of dE/dq for the charges' response."""
        if self.pivots is not None:
            rhs = torch.cat([gradient.reshape(-1), gradient.new_zeros(1)])
            return torch.linalg.lu_solve(self.factor, self.pivots, rhs[:, None])[:-1, 0]
        h = torch.cholesky_solve(gradient.reshape(-1, 1), self.factor)[:, 0]
        u = self.unit_response
        return h - u * (h.sum() / u.sum())


@dataclass(frozen=True)
class _Species:
    numbers: np.ndarray  # (n,) atomic numbers
    elements: tuple[int, ...]  # the distinct atomic numbers, ascending
    kind: torch.Tensor  # (n,) each atom's index into elements
    chi: torch.Tensor  # (n,) eV
    hardness: torch.Tensor  # (n,) eV
    shell: torch.Tensor  # (n,) principal quantum number of the Slater orbital
    zeta: torch.Tensor  # (n,) 1/Å
    spread: torch.Tensor  # (n,) ⟨r²⟩ of the orbital density, Å²


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
        self._tables: dict[tuple[tuple[int, ...], float], _ShieldingTable] = {}
        # The last system's pair list, so that its energy reuses what its matrix found; dropped by
        # release_pairs() at the end of a batch (it is tens of MB for a thousand atoms).
        self._last_pairs: tuple[System, float, PairList] | None = None

    def charges(self, systems: Sequence[System]) -> list[np.ndarray]:
        charges = [solution.charges for solution in self.solve(systems)]
        self.release_pairs()
        return charges

    def release_pairs(self) -> None:
        self._last_pairs = None

    def _neighbour_pairs(self, system: System, geometry: Geometry, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last_pairs
        if last is None or last[0] is not system or last[1] < cutoff:
            last = self._last_pairs = (system, cutoff, pair_list(system, cutoff))
        pairs, distances = neighbour_pairs(system, geometry, last[1], found=last[2])
        if last[1] > cutoff:  # the list of a longer cutoff (the matrix's Ewald one): keep what is closer
            keep = distances < cutoff
            pairs, distances = pairs[keep], distances[keep]
        return pairs, distances

    def solve(self, systems: Sequence[System]) -> list[QEqSolution]:
        return [self.solve_system(i, system) for i, system in enumerate(systems)]

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
        numbers = np.asarray(system.numbers)
        table = np.array([RAPPE_GODDARD[int(z)] for z in numbers]).reshape(-1, 3)
        shell = np.array([principal_quantum_number(int(z)) for z in numbers], dtype=np.int64)
        zeta = np.array([slater_exponent(int(z)) for z in numbers])

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.tensor(values, dtype=DTYPE, device=self.device)

        elements, kind = np.unique(numbers, return_inverse=True)
        return _Species(
            numbers=numbers,
            elements=tuple(int(z) for z in elements),
            kind=torch.as_tensor(kind.reshape(-1), device=self.device),
            chi=tensor(table[:, 0]),
            hardness=tensor(table[:, 1]),
            shell=torch.tensor(shell, device=self.device),
            zeta=tensor(zeta),
            spread=tensor((2 * shell + 2) * (2 * shell + 1) / (4.0 * zeta**2)),
        )

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
            kind, table = species.kind[None], self._shielding_table(species)

            def kernel(distances: torch.Tensor, rows: slice) -> torch.Tensor:
                return COULOMB / distances + table.shielding(distances, kind[:, rows, None], kind[:, None, :])

            return onsite + dense_pair_sums(geometry.r[None], x[None], y[None], mask, kernel)[0]
        params = self.parameters.get("ewald" if system.n_atoms < self.ewald_max_atoms else "pme", system.cell,
                                     system.n_atoms, self.accuracy)
        pairs, distances = self._neighbour_pairs(system, geometry, max(params.cutoff, self._shield_cutoff(species)))
        # The real-space sum needs only its own cutoff; the shielding's range can be longer.
        close = distances < params.cutoff
        potentials = periodic_potentials(y[:, None], system, geometry, params, pairs=(pairs[close], distances[close]))
        point = 2.0 * (x[:, None] * potentials).sum()
        i, j = pairs[:, 0], pairs[:, 1]
        shielding = self._shielding_table(species).shielding(distances, species.kind[i], species.kind[j])
        shielding = (shielding * (x[i] * y[j] + x[j] * y[i])).sum()
        volume = torch.linalg.det(geometry.cell).abs()
        s2 = species.spread
        spread = 2.0 * math.pi * COULOMB / (3.0 * volume) * ((x * s2).sum() * y.sum() + x.sum() * (y * s2).sum())
        return onsite + point + shielding + spread

    # --- the solve ---------------------------------------------------------------------------------------

    def solve_system(self, index: int, system: System) -> QEqSolution:
        """The charges of ``system``, which is ``systems[index]`` of its batch (for error messages)."""
        if system.n_atoms > self.max_atoms:
            raise QEqTooLargeError(f"systems[{index}]", system.n_atoms, self.max_atoms)
        species = self.species(system, index)
        hardness_matrix = self.matrix(system, index)
        if not torch.isfinite(hardness_matrix).all():
            raise InvalidSystemError(
                f"systems[{index}].positions",
                f"QEq cannot be set up: atoms are on top of each other; {self._closest_atoms(system)}",
            )
        factor, info = torch.linalg.cholesky_ex(hardness_matrix)
        pivots = factor.diagonal() ** 2
        if int(info) != 0 or not bool(pivots.min() > _SINGULAR_PIVOT * pivots.max()):
            return self._solve_bordered(index, system, species, hardness_matrix)
        rhs = torch.stack([-species.chi, torch.ones_like(species.chi)], dim=1)
        solved = torch.cholesky_solve(rhs, factor)
        x, u = solved[:, 0], solved[:, 1]
        charges = x + u * ((system.total_charge - x.sum()) / u.sum())
        return QEqSolution(charges=charges.cpu().numpy(), factor=factor, unit_response=u)

    def _solve_bordered(self, index: int, system: System, species: _Species, matrix: torch.Tensor) -> QEqSolution:
        """H is not (safely) positive definite, e.g. hydrogens closer than 0.77 Å: solve [[H, 1], [1ᵀ, 0]]
        [q; -μ] = [-χ; Q] by LU with partial pivoting, refusing the system where that matrix is singular."""
        n = matrix.shape[0]
        bordered = matrix.new_zeros(n + 1, n + 1)
        bordered[:n, :n] = matrix
        bordered[:n, n] = 1.0
        bordered[n, :n] = 1.0
        lu, pivots, info = torch.linalg.lu_factor_ex(bordered)
        pivot_sizes = lu.diagonal().abs()
        if int(info) != 0 or not bool(pivot_sizes.min() > _SINGULAR_PIVOT * pivot_sizes.max()):
            raise InvalidSystemError(
                f"systems[{index}].positions",
                "QEq has no unique charges for this geometry: its electronegativity-equalisation equations "
                "are singular (as for atoms on top of each other, or two hydrogens 0.77 Å apart, where their "
                f"shielded Coulomb interaction equals hydrogen's hardness); {self._closest_atoms(system)}",
            )
        rhs = torch.cat([-species.chi, species.chi.new_tensor([system.total_charge])])
        charges = torch.linalg.lu_solve(lu, pivots, rhs[:, None])[:n, 0]
        return QEqSolution(charges=charges.cpu().numpy(), factor=lu, unit_response=None, pivots=pivots)

    @staticmethod
    def _closest_atoms(system: System) -> str:
        """Where the two closest atoms are, for error messages."""
        if system.n_atoms < 2:
            return "it has a single atom"
        box = system.cell if system.cell is not None else np.zeros((3, 3))
        i, j, d = NeighborList(cutoff=2.0, full_list=False).compute(
            system.positions, box, system.pbc.tolist(), quantities="ijd")
        if len(d) == 0:
            return "no two atoms are closer than 2 Å"
        k = int(np.argmin(d))
        a, b = int(i[k]), int(j[k])
        return (f"the closest atoms are {a} ({chemical_symbols[system.numbers[a]]}) and {b} "
                f"({chemical_symbols[system.numbers[b]]}), {d[k]:.3g} Å apart")

    # --- the matrix --------------------------------------------------------------------------------------

    def _shielding_table(self, species: _Species) -> _ShieldingTable:
        key = (species.elements, self.accuracy)
        if key not in self._tables:
            self._tables[key] = _ShieldingTable.build(species.elements, self.accuracy, self.device)
        return self._tables[key]

    def _shield_cutoff(self, species: _Species) -> float:
        """Distance beyond which |J_ij(r) - k/r| of every element pair present is below the accuracy
        (relative to k/r)."""
        return float(self._shielding_table(species).cutoff.max())

    def _isolated_matrix(self, system: System, species: _Species) -> torch.Tensor:
        r = torch.tensor(system.positions, dtype=DTYPE, device=self.device)
        n = system.n_atoms
        i, j = torch.triu_indices(n, n, offset=1, device=self.device)
        distances = torch.linalg.norm(r[i] - r[j], dim=1)
        values = COULOMB / distances + self._shielding_table(species).shielding(distances, species.kind[i],
                                                                                species.kind[j])
        matrix = torch.diag(species.hardness)
        matrix[i, j] = values
        matrix[j, i] = values
        return matrix

    def _periodic_matrix(self, system: System, species: _Species) -> torch.Tensor:
        params: EwaldParameters = self.parameters.get("ewald", system.cell, system.n_atoms, self.accuracy)
        geometry = Geometry.of(system, forces=False, stress=False, device=self.device)
        n = system.n_atoms
        potential = torchpme.CoulombPotential(smearing=params.smearing, prefactor=COULOMB).to(DTYPE)
        pairs, distances = self._neighbour_pairs(system, geometry, max(params.cutoff, self._shield_cutoff(species)))
        i, j = pairs[:, 0], pairs[:, 1]
        pair = potential.sr_from_dist(distances) + self._shielding_table(species).shielding(
            distances, species.kind[i], species.kind[j])
        matrix = torch.zeros(n, n, dtype=DTYPE, device=self.device)
        matrix.index_put_((i, j), pair, accumulate=True)
        matrix.index_put_((j, i), pair, accumulate=True)
        self._add_reciprocal(matrix, geometry, potential, params)
        volume = geometry.volume
        matrix.diagonal().sub_(potential.self_contribution())
        matrix.sub_(2.0 * potential.background_correction() / volume)
        matrix.diagonal().add_(species.hardness)
        s2 = species.spread
        matrix.add_(2.0 * math.pi * COULOMB / (3.0 * volume) * (s2[:, None] + s2[None, :]))
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


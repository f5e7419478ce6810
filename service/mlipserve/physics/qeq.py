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

J_ij is evaluated exactly, in closed form: the potential of density j is elementary, and its overlap
with density i in ellipsoidal coordinates is a finite sum of Mulliken's auxiliary integrals
A_l(p) B_m(t) (p, t = r (α_i ± α_j)/2, α = 2ζ), Roothaan's 1s-1s formula being the simplest case.
B_m(t) comes from its closed form, split into its exp(±t) parts so that nothing overflows, where
that is accurate (|t| above 0.5-8.5 depending on the shells), and from Gauss-Legendre quadrature of
its defining integral (7-21 nodes, exact to rounding) below, so equal and nearly equal exponents need
no special case and J is smooth and differentiable at any distance. The tests check J against an
independent momentum-space quadrature (scipy) for shells 1s-6s (to a few 1e-9 eV) and against
Roothaan's formula, and the charges of 20 alkali-halide molecules agree with those an independent
implementation of the paper lists (cheq's tests) to the three decimals given. No Gaussian stands in
for the Slater densities anywhere. Beyond a range set per element pair, where
|J_ij(r) - k/r| < (accuracy/10) k/r (5.75 Å for H-H, 7.75 Å for O-O, 21 Å for Na-Na, 24 Å for
Cs-Cs at the default 1e-6), J_ij is taken as k/r. One exact J costs 0.4-5 µs on a CPU thread (1s-1s
to 6s-6s), too much for the ~10⁶ pairs a thousand atoms have within that range, so each element
pair's J is evaluated exactly, with its first two derivatives, on a 0.005 Å grid once per process,
and pairs are interpolated from it (quintic Hermite: error ~1e-12 eV, continuous forces).

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
limited to ``max_atoms``. The energy and forces of the QEq model itself (``QEqCorrection``) use the
Hellmann-Feynman theorem: E is stationary in q on the constraint, so dE/dr is taken at fixed q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torchpme
from ase.data import chemical_symbols
from torch.utils.checkpoint import checkpoint
from torchpme.lib import generate_kvectors_for_ewald
from vesin import NeighborList

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError, SystemTooLargeError, UnsupportedElementError
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.electrostatics import (
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
    results_from_energies,
    wants,
)
from mlipserve.physics.tuning import EwaldParameters, ParameterCache
from mlipserve_client.types import System

# (χ, J, R): electronegativity χ (eV), idempotential J = 2η (eV) and QEq radius R (Å).
# Rappé & Goddard, J. Phys. Chem. 95, 3358 (1991), Table I; the same values, with those the 1991
# table lacks, are UFF's "Xi", 2 × "Hard" and "Radius" (Rappé et al., J. Am. Chem. Soc. 114, 10024
# (1992), Table 1), as Open Babel's and RDKit's UFF.prm list them.
RAPPE_GODDARD: dict[int, tuple[float, float, float]] = {
    1: (4.528, 13.890, 0.371),  # H
    3: (3.006, 4.772, 1.557),  # Li
    4: (4.877, 8.886, 1.240),  # Be
    5: (5.110, 9.500, 0.822),  # B
    6: (5.343, 10.126, 0.759),  # C
    7: (6.899, 11.760, 0.715),  # N
    8: (8.741, 13.364, 0.669),  # O
    9: (10.874, 14.948, 0.706),  # F
    11: (2.843, 4.592, 2.085),  # Na
    12: (3.951, 7.386, 1.500),  # Mg
    13: (4.060, 7.180, 1.201),  # Al
    14: (4.168, 6.974, 1.176),  # Si
    15: (5.463, 8.000, 1.102),  # P
    16: (6.928, 8.972, 1.047),  # S
    17: (8.564, 9.892, 0.994),  # Cl
    19: (2.421, 3.840, 2.586),  # K
    20: (3.231, 5.760, 2.000),  # Ca
    21: (3.395, 6.160, 1.750),  # Sc
    22: (3.470, 6.760, 1.607),  # Ti
    23: (3.650, 6.820, 1.470),  # V
    24: (3.415, 7.730, 1.402),  # Cr
    25: (3.325, 8.210, 1.533),  # Mn
    26: (3.760, 8.280, 1.393),  # Fe
    27: (4.105, 8.350, 1.406),  # Co
    28: (4.465, 8.410, 1.398),  # Ni
    29: (4.200, 8.440, 1.434),  # Cu
    30: (5.106, 8.570, 1.400),  # Zn
    31: (3.641, 6.320, 1.211),  # Ga
    32: (4.051, 6.876, 1.189),  # Ge
    33: (5.188, 7.618, 1.204),  # As
    34: (6.428, 8.262, 1.224),  # Se
    35: (7.790, 8.850, 1.141),  # Br
    37: (2.331, 3.692, 2.770),  # Rb
    38: (3.024, 4.880, 2.415),  # Sr
    39: (3.830, 5.620, 1.998),  # Y
    40: (3.400, 7.100, 1.758),  # Zr
    41: (3.550, 6.760, 1.603),  # Nb
    42: (3.465, 7.510, 1.530),  # Mo
    46: (4.320, 8.000, 1.544),  # Pd
    47: (4.436, 6.268, 1.622),  # Ag
    48: (5.034, 7.914, 1.600),  # Cd
    49: (3.506, 5.792, 1.404),  # In
    50: (3.987, 6.248, 1.354),  # Sn
    51: (4.899, 6.684, 1.404),  # Sb
    52: (5.816, 7.052, 1.380),  # Te
    53: (6.822, 7.524, 1.333),  # I
    55: (2.183, 3.422, 2.984),  # Cs
    56: (2.814, 4.792, 2.442),  # Ba
    72: (3.700, 6.800, 1.759),  # Hf
    73: (5.100, 5.700, 1.605),  # Ta
    74: (4.630, 6.620, 1.538),  # W
    78: (4.790, 8.860, 1.557),  # Pt
    79: (4.894, 5.172, 1.618),  # Au
    82: (3.900, 7.060, 1.444),  # Pb
    83: (4.690, 7.480, 1.514),  # Bi
}
# Rappé & Goddard's scale of the Slater exponents, ζ = λ (2n + 1) / (2R).
SLATER_LAMBDA = 0.4913
# A dense n×n solve: 3,000 atoms is ~70 MB per matrix and seconds of CPU (benchmarks/corrections.py).
MAX_ATOMS = 3000
# k-vectors per chunk of the periodic matrix's reciprocal sum, times atoms: bounds the cos/sin tables.
_KSPACE_CHUNK = 1 << 22
# Pairs per chunk of Slater integrals: bounds each (pairs × up to 46) intermediate to ~100 MB.
_SLATER_CHUNK = 1 << 18
# Cholesky (squared) or LU pivots below this fraction of the largest: the matrix counts as singular.
_SINGULAR_PIVOT = 1e-10


def principal_quantum_number(z: int) -> int:
    """n of the valence s shell: 1 for H-He, 2 for Li-Ne, ..., 7 from Fr."""
    return 1 + sum(z > last for last in (2, 10, 18, 36, 54, 86))


def slater_exponent(z: int) -> float:
    """ζ (1/Å) of element z's ns Slater orbital: λ (2n + 1) / (2R), from its QEq radius R."""
    return SLATER_LAMBDA * (2 * principal_quantum_number(z) + 1) / (2.0 * RAPPE_GODDARD[z][2])


class QEqTooLargeError(SystemTooLargeError):
    """A system with more atoms than QEq's dense solve takes (``QEq.max_atoms``)."""

    def __init__(self, field: str, n_atoms: int, limit: int) -> None:
        super().__init__(field, n_atoms, limit)
        self.args = (f"{field}: QEq solves densely (O(n³)); {n_atoms} atoms is more than its limit of {limit}",)


# --- the Coulomb integral of two ns Slater densities ---------------------------------------------------


def slater_coulomb(distance: torch.Tensor, n_a: torch.Tensor, zeta_a: torch.Tensor, n_b: torch.Tensor,
                   zeta_b: torch.Tensor) -> torch.Tensor:
    """∫∫ ρ_a(r) ρ_b(r') / |r - r'| (1/Å; times k for eV) of two normalised ns Slater densities
    ρ ∝ r^(2n-2) exp(-2ζr) whose centres are ``distance`` > 0 apart. Arguments broadcast together;
    n are integer tensors, ζ in 1/Å. Exact (module docstring) and differentiable in the distance."""
    distance, n_a, zeta_a, n_b, zeta_b = torch.broadcast_tensors(distance, n_a, zeta_a, n_b, zeta_b)
    shape = distance.shape
    # One order per pair, so that J(a, b) and J(b, a) are the same floating-point number.
    swap = (n_a > n_b) | ((n_a == n_b) & (zeta_a > zeta_b))
    n_a, n_b = torch.where(swap, n_b, n_a).reshape(-1), torch.where(swap, n_a, n_b).reshape(-1)
    zeta_a, zeta_b = torch.where(swap, zeta_b, zeta_a).reshape(-1), torch.where(swap, zeta_a, zeta_b).reshape(-1)
    r = distance.reshape(-1)
    out = r.new_zeros(r.shape)
    code = n_a * 16 + n_b
    for value in torch.unique(code).tolist():
        index = torch.nonzero(code == value)[:, 0]
        out = out.index_put((index,), _chunked(r[index], value // 16, zeta_a[index], value % 16, zeta_b[index]))
    return out.reshape(shape)


def _chunked(r: torch.Tensor, n_a: int, zeta_a: torch.Tensor, n_b: int, zeta_b: torch.Tensor) -> torch.Tensor:
    if len(r) <= _SLATER_CHUNK:
        return _slater_same_shells(r, n_a, zeta_a, n_b, zeta_b)
    parts = []
    for start in range(0, len(r), _SLATER_CHUNK):
        piece = slice(start, start + _SLATER_CHUNK)
        args = (r[piece], n_a, zeta_a[piece], n_b, zeta_b[piece])
        if torch.is_grad_enabled() and r.requires_grad:
            parts.append(checkpoint(_slater_same_shells, *args, use_reentrant=False))
        else:
            parts.append(_slater_same_shells(*args))
    return torch.cat(parts)


# J_ab(r) of each element pair is tabulated (with J' and J'') on a uniform grid up to the pair's
# shielding range and evaluated by quintic Hermite interpolation: ~30 flops per pair (and their
# small autograd graph) instead of the exact formula's hundreds. The error is ~h⁶ J⁽⁶⁾/46080, below
# 1e-12 eV for H-H (the steepest pair) at this step; values and derivatives at the nodes are exact.
_TABLE_START = 0.05  # Å; the service refuses atoms closer than 0.1 Å (mlipserve.geometry)
_TABLE_STEP = 0.005  # Å


@lru_cache(maxsize=None)
def _pair_table(n_a: int, zeta_a: float, n_b: int, zeta_b: float, end: float) -> torch.Tensor:
    """(N, 3): J, dJ/dr, d²J/dr² (1/Å, 1/Å², 1/Å³) at r = _TABLE_START + k _TABLE_STEP, up to ``end``."""
    count = math.ceil((end - _TABLE_START) / _TABLE_STEP) + 2
    r = (_TABLE_START + _TABLE_STEP * torch.arange(count, dtype=DTYPE)).requires_grad_(True)
    with torch.enable_grad():
        j = slater_coulomb(r, torch.tensor(n_a), torch.tensor(zeta_a, dtype=DTYPE), torch.tensor(n_b),
                           torch.tensor(zeta_b, dtype=DTYPE))
        (slope,) = torch.autograd.grad(j.sum(), r, create_graph=True)
        (curvature,) = torch.autograd.grad(slope.sum(), r)
    return torch.stack([j.detach(), slope.detach(), curvature.detach()], dim=1)


@dataclass(frozen=True)
class _ShieldingTable:
    """The pair tables of a system's elements, concatenated: pair (a, b) of element kinds starts at
    ``offset[a * K + b]`` and has ``length[a * K + b]`` nodes; beyond ``cutoff[a, b]`` J is k/r."""

    nodes: torch.Tensor  # (total, 3)
    offset: torch.Tensor  # (K*K,)
    length: torch.Tensor  # (K*K,)
    cutoff: torch.Tensor  # (K, K) Å

    @classmethod
    def build(cls, elements: Sequence[int], accuracy: float, device: torch.device) -> _ShieldingTable:
        kinds = len(elements)
        pairs = [(a, b) for a in range(kinds) for b in range(kinds)]
        cutoffs = _element_shield_cutoffs([(elements[a], elements[b]) for a, b in pairs], accuracy)
        tables, offset, length, start = {}, [], [], 0
        for (a, b), cutoff in zip(pairs, cutoffs):
            key = (min(a, b), max(a, b))
            if key not in tables:
                za, zb = elements[key[0]], elements[key[1]]
                table = _pair_table(principal_quantum_number(za), slater_exponent(za), principal_quantum_number(zb),
                                    slater_exponent(zb), cutoff)
                tables[key] = (start, table)
                start += len(table)
            offset.append(tables[key][0])
            length.append(len(tables[key][1]))
        return cls(
            nodes=torch.cat([t for _, t in tables.values()]).to(device),
            offset=torch.tensor(offset, device=device),
            length=torch.tensor(length, device=device),
            cutoff=torch.tensor(cutoffs, dtype=DTYPE, device=device).reshape(kinds, kinds),
        )

    def shielding(self, distance: torch.Tensor, kind_a: torch.Tensor, kind_b: torch.Tensor) -> torch.Tensor:
        """k (J_ab(r) - 1/r) in eV for atoms of element kinds a and b ``distance`` apart, 0 beyond the
        pair's range (where it is below the accuracy). Arguments broadcast together; differentiable
        in the distance."""
        distance, kind_a, kind_b = torch.broadcast_tensors(distance, kind_a, kind_b)
        kind_a, kind_b = kind_a.reshape(-1), kind_b.reshape(-1)
        near = torch.nonzero(distance.reshape(-1) < self.cutoff[kind_a, kind_b])[:, 0]
        r = distance.reshape(-1)[near]
        pair = kind_a[near] * len(self.cutoff) + kind_b[near]
        position = (r - _TABLE_START) / _TABLE_STEP
        cell = torch.minimum(position.detach().floor().long().clamp(min=0), self.length[pair] - 2)
        t = position - cell
        left, right = self.nodes[self.offset[pair] + cell], self.nodes[self.offset[pair] + cell + 1]
        h = _TABLE_STEP
        t2 = t * t
        t3 = t2 * t
        t4, t5 = t3 * t, t3 * t2
        j = ((1 - 10 * t3 + 15 * t4 - 6 * t5) * left[:, 0] + (10 * t3 - 15 * t4 + 6 * t5) * right[:, 0]
             + h * ((t - 6 * t3 + 8 * t4 - 3 * t5) * left[:, 1] + (-4 * t3 + 7 * t4 - 3 * t5) * right[:, 1])
             + h * h * (0.5 * (t2 - 3 * t3 + 3 * t4 - t5) * left[:, 2] + 0.5 * (t3 - 2 * t4 + t5) * right[:, 2]))
        out = distance.new_zeros(distance.numel()).index_put((near,), COULOMB * (j - 1.0 / r))
        return out.reshape(distance.shape)


@dataclass(frozen=True)
class _SlaterPlan:
    """Constants of J for one pair of shells (n_a, n_b); m = 2n - 2 is a density's power of r."""

    m_b: int
    potential: tuple[float, ...]  # r V_b(r) = 1 - exp(-x) Σ_k potential[k] x^k, x = α_b r
    a_terms: torch.Tensor  # (L+1, L+1): exp(p) A_l(p) = Σ_v p^-(v+1) a_terms[v, l]
    b_terms: torch.Tensor  # (L+1, 2(L+1)): B_l(t) = e^t Σ_v t^-(v+1) b[v, l] + e^-t Σ_v t^-(v+1) b[v, L+1+l]
    switch: float  # |t| below which B comes from quadrature rather than the closed form
    nodes: torch.Tensor  # (N,) Gauss-Legendre nodes on [-1, 1]
    quadrature: torch.Tensor  # (N, L+1): weight_i node_i^l
    overlap: tuple[torch.Tensor, ...]  # per k: c with Σ_b c[b] A_(m_b+1+k-b) B_b, the (α_a r/2)^k term


@lru_cache(maxsize=None)
def _plan(n_a: int, n_b: int) -> _SlaterPlan:
    m_a, m_b = 2 * n_a - 2, 2 * n_b - 2
    power = m_b + 1  # of r_b in r_b² ρ_b(r_b) W_a(r_a) d³r, with d³r = (R/2) r_a r_b dξ dη dφ
    kmax = m_a + 1  # W_a(s) = exp(-α_a s) Σ_k weights[k] (α_a s)^k / s
    lmax = power + kmax
    size = lmax + 1
    weights = [(m_a + 2 - k) / ((m_a + 2) * math.factorial(k)) for k in range(kmax + 1)]
    overlap = []
    for k in range(kmax + 1):
        # r_b^power r_a^k = (R/2)^(power+k) (ξ + η)^power (ξ - η)^k = Σ_b c_b ξ^(power+k-b) η^b
        coefficients = np.zeros(power + k + 1)
        for i in range(power + 1):
            for j in range(k + 1):
                coefficients[i + j] += weights[k] * math.comb(power, i) * math.comb(k, j) * (-1) ** j
        overlap.append(torch.tensor(coefficients, dtype=DTYPE))
    a_terms, b_plus, b_minus = (np.zeros((size, size)) for _ in range(3))
    for l in range(size):
        for u in range(l + 1):  # A_l = e^-p Σ_u l!/u! p^-(l-u+1); β±_l likewise, signs apart
            a_terms[l - u, l] = math.factorial(l) / math.factorial(u)
            b_plus[l - u, l] = (-1) ** u * math.factorial(l) / math.factorial(u)
            b_minus[l - u, l] = -math.factorial(l) / math.factorial(u)

    # The closed form sums terms up to l!/|t|^(l+1) e^|t| to a result ~e^|t|/|t|: accurate from some
    # |t| on, found here against the power series Σ_j (-t)^j/j! 2/(l+j+1) (terms of one sign, so
    # exact); below that |t|, Gauss-Legendre quadrature of ∫ η^l e^(-tη) dη with the fewest nodes
    # that match the series. Both to 1e-14 relative to e^|t| (the scale of B, and of its rounding).
    def series(t: np.ndarray) -> np.ndarray:
        total, term = np.zeros((len(t), size)), np.ones_like(t)
        for j in range(int(np.abs(t).max(initial=0.0)) * 3 + 60):
            term = term * (-t / j) if j else term
            total[:, j % 2::2] += term[:, None] * 2.0 / (np.arange(j % 2, size, 2) + j + 1)
        return total

    def closed(t: np.ndarray) -> np.ndarray:
        inverse = (1.0 / t)[:, None] ** np.arange(1, size + 1)
        return np.exp(t)[:, None] * (inverse @ b_plus) + np.exp(-t)[:, None] * (inverse @ b_minus)

    def error(found: np.ndarray, t: np.ndarray) -> float:
        return float((np.abs(found - series(t)) / np.exp(np.abs(t))[:, None]).max())

    switch = 0.5
    while switch < lmax + 2:
        t = np.concatenate([np.linspace(switch, lmax + 8.0, 60), -np.linspace(switch, lmax + 8.0, 60)])
        if error(closed(t), t) < 1e-14:
            break
        switch += 0.5
    t = np.linspace(-switch, switch, 101)
    for count in range(4, 64):
        nodes, node_weights = np.polynomial.legendre.leggauss(count)
        quadrature = node_weights[:, None] * nodes[:, None] ** np.arange(size)
        if error(np.exp(-np.outer(t, nodes)) @ quadrature, t) < 1e-14:
            break
    return _SlaterPlan(
        m_b=m_b,
        potential=tuple((m_b + 2 - k) / ((m_b + 2) * math.factorial(k)) for k in range(m_b + 2)),
        a_terms=torch.tensor(a_terms, dtype=DTYPE),
        b_terms=torch.tensor(np.concatenate([b_plus, b_minus], axis=1), dtype=DTYPE),
        switch=switch,
        nodes=torch.tensor(nodes, dtype=DTYPE),
        quadrature=torch.tensor(quadrature, dtype=DTYPE),
        overlap=tuple(overlap),
    )


def _powers(x: torch.Tensor, count: int) -> torch.Tensor:
    """(P, count): x, x², ..., x^count."""
    return x[:, None].expand(-1, count).cumprod(dim=1)


def _horner(coefficients: Sequence, x: torch.Tensor) -> torch.Tensor:
    """Σ_k coefficients[k] x^k."""
    total = torch.zeros_like(x) + coefficients[-1]
    for coefficient in reversed(coefficients[:-1]):
        total = total * x + coefficient
    return total


def _slater_same_shells(r: torch.Tensor, n_a: int, zeta_a: torch.Tensor, n_b: int,
                        zeta_b: torch.Tensor) -> torch.Tensor:
    """J(r) for pairs that all have shells (n_a, n_b): J = V_b(r) - ∫ ρ_b W_a, where ρ_a's potential is
    V_a(s) = 1/s - W_a(s); the integral in ellipsoidal coordinates ξ = (r_b + r_a)/r, η = (r_b - r_a)/r
    is a sum of A_l(p) = ∫_1^∞ ξ^l e^(-pξ) dξ times B_l(t) = ∫_-1^1 η^l e^(-tη) dη, with
    p = r (α_a + α_b)/2, t = r (α_b - α_a)/2."""
    plan = _plan(n_a, n_b)
    size = plan.a_terms.shape[0]
    alpha_a, alpha_b = 2.0 * zeta_a, 2.0 * zeta_b
    x_b = alpha_b * r
    potential_b = 1.0 - torch.exp(-x_b) * _horner(plan.potential, x_b)  # r V_b(r)

    p = 0.5 * r * (alpha_a + alpha_b)
    t = 0.5 * r * (alpha_b - alpha_a)
    a_scaled = _powers(1.0 / p, size) @ plan.a_terms.to(r)  # e^p A_l(p)
    # e^-p B_l(t): by quadrature where |t| < switch, else e^-(α_a r) β⁺_l + e^-(α_b r) β⁻_l. Each branch
    # sees harmless values where it is not used, so that neither makes inf or NaN (gradients included).
    small = t.abs() < plan.switch
    t_small = torch.where(small, t, torch.zeros_like(t))
    quadrature = torch.exp(-(p[:, None] + t_small[:, None] * plan.nodes.to(r))) @ plan.quadrature.to(r)
    t_large = torch.where(small, torch.full_like(t, plan.switch), t)
    parts = _powers(1.0 / t_large, size) @ plan.b_terms.to(r)
    closed = torch.exp(-alpha_a * r)[:, None] * parts[:, :size] + torch.exp(-alpha_b * r)[:, None] * parts[:, size:]
    b_scaled = torch.where(small[:, None], quadrature, closed)

    # Σ_k (α_a r/2)^k Σ_b c_kb A_(top-b) B_b, top = m_b + 1 + k: A reversed makes each a slice.
    a_reversed = a_scaled.flip(dims=(1,))
    by_k = []
    for k, coefficients in enumerate(plan.overlap):
        top = plan.m_b + 1 + k
        by_k.append((a_reversed[:, size - 1 - top:size] * b_scaled[:, :top + 1]) @ coefficients.to(r))
    overlap = _horner(by_k, 0.5 * alpha_a * r) * (0.5 * x_b) ** (plan.m_b + 3) / math.factorial(plan.m_b + 2)
    return (potential_b - overlap) / r


# (z_a, z_b, accuracy) -> distance (Å) beyond which |r J_ab(r)/k - 1| < accuracy/10.
_SHIELD_CUTOFFS: dict[tuple[int, int, float], float] = {}


def _element_shield_cutoffs(pairs: Sequence[tuple[int, int]], accuracy: float) -> list[float]:
    """The shielding range of each element pair (rounded up to 0.25 Å), computed once per process."""
    pairs = [(min(a, b), max(a, b)) for a, b in pairs]
    missing = sorted({(a, b) for a, b in pairs if (a, b, accuracy) not in _SHIELD_CUTOFFS})
    if missing:
        r = torch.arange(0.5, 100.0, 0.25, dtype=DTYPE)
        shells = torch.tensor([[principal_quantum_number(z) for z in pair] for pair in missing])
        exponents = torch.tensor([[slater_exponent(z) for z in pair] for pair in missing], dtype=DTYPE)
        with torch.no_grad():
            slater = slater_coulomb(r[None, :], shells[:, :1], exponents[:, :1], shells[:, 1:], exponents[:, 1:])
        above = (1.0 - r * slater).abs() > accuracy / 10.0
        last = torch.where(above.any(dim=1), (above * torch.arange(1, len(r) + 1)).argmax(dim=1) + 1, 0)
        for pair, index in zip(missing, last.tolist()):
            _SHIELD_CUTOFFS[(*pair, accuracy)] = float(r[min(index, len(r) - 1)])
    return [_SHIELD_CUTOFFS[(a, b, accuracy)] for a, b in pairs]


# --- QEq -----------------------------------------------------------------------------------------------


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
        geometries, energies, solutions = [], [], []
        for i, system in enumerate(batch.systems):
            # Solved and evaluated system by system: the energy reuses the matrix's pair list.
            solution = self.qeq.solve_system(i, system)
            solutions.append(solution)
            geometry = Geometry.of(system, forces=want_forces, stress=want_stress and system.cell is not None,
                                   device=self.qeq.device)
            q = torch.tensor(solution.charges, dtype=DTYPE, device=self.qeq.device)
            species = self.qeq.species(system, i)
            energies.append((species.chi * q).sum() + 0.5 * self.qeq.interaction(system, geometry, q, q))
            geometries.append(geometry)
        self.qeq.release_pairs()
        return results_from_energies(energies, geometries, [s.charges for s in solutions])

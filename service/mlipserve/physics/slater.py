"""The Coulomb integral of two normalised ns Slater densities, J_ij(r) = k ∫∫ |φ_i(r)|² |φ_j(r')|² / |r - r'|
(QEq's shielded interaction, ``mlipserve.physics.qeq``, whose docstring defines the orbitals), exactly
and from per-element-pair tables.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from mlipserve.physics.coulomb import COULOMB, DTYPE
from mlipserve.physics.qeq_parameters import principal_quantum_number, slater_exponent

# Pairs per chunk of Slater integrals: bounds each (pairs × up to 46) intermediate to ~100 MB.
_SLATER_CHUNK = 1 << 18


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


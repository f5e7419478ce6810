"""Grimme's D3 dispersion with zero or Becke-Johnson damping on torch-dftd's reference data, in
float64, batched over the systems of a Batch, with forces and stress by autograd.

Defaults are MACE-MP's (``mace_mp(dispersion=True)``): D3(BJ) with PBE parameters, a 40 bohr
pairwise cutoff and torch-dftd's default 40 bohr coordination-number cutoff, no three-body term, no
cutoff smoothing; the Axilrod-Teller-Muto three-body term is not offered (torch-dftd 0.5.3's ``abc``
took 105 s for three small cells here and its forces on a 2-atom Si cell were 1.2 eV/Å off
s-dftd3's). The pair sum is torch-dftd's ``edisp`` rearranged for speed (``_pair_energies``). Its
unit constants (the original dftd3 code's Bohr 0.52917726 Å and Hartree 27.21138505 eV, also baked
into its tabulated radii) are replaced by ASE's (CODATA), which is what s-dftd3 and its ASE
interface use: energies then agree to ~1e-7 eV or better. Functional parameters are typed in from s-dftd3's parameters.toml (with the
references there) rather than taken from torch-dftd's table, which rounds r²SCAN's and lacks some
names. Neighbour pairs come from vesin (a half list, any mix of periodic axes); torch-dftd's own
ASE/pymatgen neighbour search is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase.data import chemical_symbols
from ase.units import Bohr, Hartree
from torch_dftd.functions.dftd3 import d3_autoang, d3_k1, d3_k3
from torch_dftd.nn.dftd3_module import DFTD3Module
from vesin import NeighborList

from mlipserve.backends.base import Batch
from mlipserve.errors import UnsupportedElementError
from mlipserve.physics.d3_parameters import damping_parameters
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.coulomb import DTYPE, Geometry, results_from_energies, wants
from mlipserve_client.types import System

# torch-dftd's D3 reference data covers Z = 1..94.
MAX_ATOMIC_NUMBER = 94
DEFAULT_CUTOFF = 40.0 * Bohr  # Å, MACE-MP's dispersion_cutoff
DEFAULT_CN_CUTOFF = 40.0 * Bohr  # Å, torch-dftd's cnthr
# torch-dftd's radii were converted from Å with the old Bohr: this converts them with ASE's.
_LENGTH_SCALE = d3_autoang / Bohr

class D3Dispersion:
    """D3 dispersion as a Correction: ``D3Dispersion("pbe", "bj")`` is MACE-MP's D3(BJ)-PBE.
    cutoff (pairs) and cn_cutoff (coordination numbers) in Å."""

    def __init__(
        self,
        functional: str = "pbe",
        damping: str = "bj",
        cutoff: float = DEFAULT_CUTOFF,
        cn_cutoff: float = DEFAULT_CN_CUTOFF,
        device: str = "cpu",
    ) -> None:
        functional = functional.lower().replace("-", "")
        self.functional = functional
        self.damping = damping
        self.cutoff = cutoff
        self.device = torch.device(device)
        # torch-dftd prints a warning and clamps when cnthr > cutoff: clamp here, silently.
        self.module = DFTD3Module(
            damping_parameters(functional, damping),
            cutoff=cutoff,
            cnthr=min(cn_cutoff, cutoff),
            abc=False,
            dtype=DTYPE,
            bidirectional=False,
        ).to(self.device)
        with torch.no_grad():
            # The reference radii were converted from Å with the old Bohr: convert them with ASE's.
            self.module.r0ab.mul_(_LENGTH_SCALE)
            self.module.rcov.mul_(_LENGTH_SCALE)

    @property
    def name(self) -> str:
        return f"d3({self.damping})-{self.functional}"

    def compute(self, batch: Batch, model_charges: Sequence[np.ndarray | None] | None = None) -> list[CorrectionResult]:
        want_forces, want_stress = wants(batch)
        for index, system in enumerate(batch.systems):
            _check_elements(system, index)
        geometries = [
            Geometry.of(s, forces=want_forces, stress=want_stress and s.cell is not None, device=self.device)
            for s in batch.systems
        ]
        energies = self._energies(batch.systems, geometries)
        return results_from_energies(list(energies), geometries)

    def _energies(self, systems: Sequence[System], geometries: Sequence[Geometry]) -> torch.Tensor:
        """All systems at once: atoms concatenated, pair indices offset, one energy per system (eV)."""
        i_all, j_all, vectors, edge_batch = [], [], [], []
        offset = 0
        for k, (system, geometry) in enumerate(zip(systems, geometries)):
            i, j, shifts = _pairs(system, self.cutoff)
            i, j = i.to(self.device), j.to(self.device)
            vector = geometry.r[j] - geometry.r[i]
            if geometry.cell is not None:
                vector = vector + shifts.to(self.device) @ geometry.cell
            vectors.append(vector)
            i_all.append(i + offset)
            j_all.append(j + offset)
            edge_batch.append(torch.full((len(i),), k, dtype=torch.long, device=self.device))
            offset += system.n_atoms
        numbers = torch.tensor(np.concatenate([s.numbers for s in systems]), dtype=torch.long, device=self.device)
        pair_energy = self._pair_energies(
            numbers, torch.cat(i_all), torch.cat(j_all), torch.linalg.norm(torch.cat(vectors), dim=1) / Bohr)
        energies = pair_energy.new_zeros(len(systems)).index_add_(0, torch.cat(edge_batch), pair_energy)
        return energies * Hartree

    def _pair_energies(self, numbers: torch.Tensor, i: torch.Tensor, j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """D3 energy (Hartree) of each pair of a half list (i, j, distance r in bohr).

        The same sum as torch-dftd's ``edisp``, arranged for speed: its C6 interpolation gathers and
        softmaxes a 5x5x3 reference block for every pair. The Gaussian weights factorize over the two
        atoms (exp(k3[(CNi-CNa)² + (CNj-CNb)²]) = uᵢₐ·uⱼᵦ, and D3's reference table is such that
        which references exist and their CN depend on one element only), so the weights are one
        softmax over 5 references per atom, and C6ᵢⱼ = wᵢᵀ C6ref[Zi, Zj] wⱼ is contracted per atom
        and partner element first, leaving 5 products per pair.
        """
        module = self.module
        species, kind = torch.unique(numbers, return_inverse=True)  # kind: index into species
        n_species = len(species)
        # Per element pair, looked up per atom pair by one index: a pair's (element, element) kind.
        pair_kind = kind[i] * n_species + kind[j]

        def by_pair(table: torch.Tensor) -> torch.Tensor:
            return table.reshape(-1)[pair_kind]

        # Coordination numbers: a counting function of rcov-scaled distances within cnthr.
        rcov = module.rcov[species]
        count = torch.sigmoid(d3_k1 * (by_pair(rcov[:, None] + rcov[None, :]) / r - 1.0))
        if module.cnthr < self.cutoff:
            count = torch.where(r <= module.cnthr / Bohr, count, 0.0)
        cn = count.new_zeros(len(numbers)).index_add(0, i, count).index_add(0, j, count)

        table = module.c6ab[species][:, species]  # (s, s, 5, 5, 3)
        diagonal = torch.arange(n_species, device=numbers.device)
        cn_ref = table[diagonal, diagonal, :, 0, 1]  # (s, 5): the references' CN, per element
        exists = table[diagonal, diagonal, :, 0, 0] > 0  # (s, 5)
        logits = torch.where(exists[kind], d3_k3 * (cn[:, None] - cn_ref[kind]) ** 2, -torch.inf)
        weights = torch.softmax(logits, dim=1)  # (n, 5)
        # partner[a, t, :] = wₐᵀ C6ref[Za, species t], (n·s, 5); C6ᵢⱼ = partner[i, Zj] · wⱼ
        partner = torch.einsum("na,ntab->ntb", weights, table[..., 0][kind]).reshape(-1, 5)
        c6 = (partner[i * n_species + kind[j]] * weights[j]).sum(dim=1)

        r2r4 = module.r2r4[species]
        c8_over_c6 = 3.0 * r2r4[:, None] * r2r4[None, :]  # (s, s)
        params = module.params
        r6 = r ** 6
        r8 = r6 * r * r
        if self.damping == "bj":
            radius = params["rs6"] * torch.sqrt(c8_over_c6) + params["rs18"]
            e6 = 1.0 / (r6 + by_pair(radius ** 6))
            e8 = 1.0 / (r8 + by_pair(radius ** 8))
        else:
            ratio = by_pair(module.r0ab[species][:, species]) / r
            e6 = 1.0 / (1.0 + 6.0 * (params["rs6"] * ratio) ** params["alp"]) / r6
            e8 = 1.0 / (1.0 + 6.0 * (params["rs18"] * ratio) ** (params["alp"] + 2.0)) / r8
        # A half list holds each pair once: no factor 1/2.
        return -c6 * (params["s6"] * e6 + params["s18"] * by_pair(c8_over_c6) * e8)


def _pairs(system: System, cutoff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    box = system.cell if system.cell is not None else np.zeros((3, 3))
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=False).compute(
        system.positions, box, system.pbc.tolist(), quantities="ijS"
    )
    return (torch.as_tensor(i.astype(np.int64)), torch.as_tensor(j.astype(np.int64)),
            torch.as_tensor(shifts, dtype=DTYPE))


def _check_elements(system: System, index: int) -> None:
    bad = (system.numbers < 1) | (system.numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        atom = int(np.flatnonzero(bad)[0])
        z = int(system.numbers[atom])
        symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
        raise UnsupportedElementError(
            f"systems[{index}].atomic_numbers[{atom}]",
            f"D3 has reference data for H-Pu (Z 1-{MAX_ATOMIC_NUMBER}); atom {atom} is {symbol}",
        )

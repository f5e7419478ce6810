"""Grimme's D3 dispersion with zero or Becke-Johnson damping, from torch-dftd's D3 kernel, in float64,
batched over the systems of a Batch, with forces and stress by autograd.

Defaults are MACE-MP's (``mace_mp(dispersion=True)``): D3(BJ) with PBE parameters, a 40 bohr
pairwise cutoff and torch-dftd's default 40 bohr coordination-number cutoff, no three-body term, no
cutoff smoothing; the Axilrod-Teller-Muto three-body term is not offered (torch-dftd 0.5.3's ``abc``
took 105 s for three small cells here and its forces on a 2-atom Si cell were 1.2 eV/Å off
s-dftd3's). torch-dftd's unit constants (the original dftd3 code's Bohr 0.52917726 Å and Hartree
27.21138505 eV, also baked into its tabulated radii) are replaced by ASE's (CODATA) by scaling its
inputs, radii and output, which is what s-dftd3 and its ASE interface use: energies then agree to
~1e-7 eV or better. Functional parameters are typed in from s-dftd3's parameters.toml (with the
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
from torch_dftd.functions.dftd3 import d3_autoang, d3_autoev
from torch_dftd.nn.dftd3_module import DFTD3Module
from vesin import NeighborList

from mlipserve.backends.base import Batch
from mlipserve.errors import UnsupportedElementError
from mlipserve.physics.d3_parameters import damping_parameters
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.electrostatics import DTYPE, Geometry, results_from_energies, wants
from mlipserve_client.types import System

# torch-dftd's D3 reference data covers Z = 1..94.
MAX_ATOMIC_NUMBER = 94
DEFAULT_CUTOFF = 40.0 * Bohr  # Å, MACE-MP's dispersion_cutoff
DEFAULT_CN_CUTOFF = 40.0 * Bohr  # Å, torch-dftd's cnthr
# Lengths are scaled so that torch-dftd's Å -> bohr conversion uses ASE's Bohr, and its energy so
# that its bohr -> eV conversion uses ASE's Hartree.
_LENGTH_SCALE = d3_autoang / Bohr
_ENERGY_SCALE = Hartree / d3_autoev

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
        """All systems in one torch-dftd call: atoms concatenated, pairs offset, a batch index."""
        edges, shift_vectors, atom_batch, edge_batch, cells = [], [], [], [], []
        offset = 0
        for k, (system, geometry) in enumerate(zip(systems, geometries)):
            i, j, shifts = _pairs(system, self.cutoff)
            edges.append(torch.stack([i, j]) + offset)
            cell = geometry.cell if geometry.cell is not None else torch.eye(3, dtype=DTYPE, device=self.device)
            shift_vectors.append(shifts.to(self.device) @ (cell * _LENGTH_SCALE))
            atom_batch.append(torch.full((system.n_atoms,), k, dtype=torch.long))
            edge_batch.append(torch.full((len(i),), k, dtype=torch.long))
            cells.append(cell * _LENGTH_SCALE)
            offset += system.n_atoms
        energies = self.module.calc_energy_batch(
            Z=torch.tensor(np.concatenate([s.numbers for s in systems]), dtype=torch.long, device=self.device),
            pos=torch.cat([g.r for g in geometries]) * _LENGTH_SCALE,
            edge_index=torch.cat(edges, dim=1).to(self.device),
            # torch-dftd counts the systems by the cells: one per system, the identity when isolated.
            cell=torch.stack(cells),
            shift_pos=torch.cat(shift_vectors),
            batch=torch.cat(atom_batch).to(self.device),
            batch_edge=torch.cat(edge_batch).to(self.device),
            damping=self.damping,
        )
        return energies * _ENERGY_SCALE


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

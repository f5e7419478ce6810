"""Long-range electrostatics of point charges: PME or Ewald (torch-pme 0.5) for periodic cells, a
direct pairwise sum for isolated systems, in float64, with forces and stress by autograd.

Energy (eV): E = Σ_{i<j, images} k q_i q_j [1 - w(r_ij)] / r_ij, k = 14.3996 eV·Å/e² (torch-pme's
``prefactors.eV_A``), where w is the exclusion switch: w = 1 below ``exclusion_radius - exclusion_width``,
a cosine down to 0 at ``exclusion_radius``, and 0 beyond (width 0: a sharp step). It removes the
Coulomb interaction of pairs that the model already describes within its cutoff, smoothly by
default so that energies stay continuous when pairs cross the radius. The switch is applied inside
torch-pme's potential (``mlipserve.physics.coulomb``).

Periodic cells (all three axes) use torch-pme's convention: a charged cell is neutralised by a
uniform background, E_bg = -π σ² k Q² / V (σ: torch-pme's smearing, α = 1/(√2 σ) in the usual Ewald
notation: -π Q²/(2 V α²)), which torch-pme already adds (``background_correction``). Slabs and wires
are rejected: torch-pme 0.5's 2D correction assumes the vacuum axis is a Cartesian axis and a vacuum
gap several times the slab thickness, which requests do not guarantee. Method "auto" uses Ewald below
``ewald_max_atoms`` atoms and PME (6 interpolation nodes) above; parameters come from
``mlipserve.physics.tuning`` (analytic, cached per cell shape), never from torch-pme's tuners.

Charges: "request" (``System.atomic_charges``, summing to ``total_charge``), "model" (the charges
a model predicted, passed by the caller) or "qeq" (``mlipserve.physics.qeq.QEq``; forces then include
the response of the charges to the positions, by the adjoint of the QEq equations). QEq builds on
the same kernels as this module and is not imported here: it is passed in (``qeq``), or supplied by
``mlipserve.physics.qeq_corrections.Electrostatics``, which is what the service builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.coulomb import (
    COULOMB,
    DTYPE,
    EWALD_MAX_ATOMS,
    Exclusion,
    Geometry,
    dense_pair_sums,
    fully_periodic,
    pad,
    periodic_potentials,
    results_from_energies,
    wants,
)
from mlipserve.physics.tuning import EwaldParameters, ParameterCache, PMEParameters
from mlipserve_client.types import System

METHODS = ("auto", "pme", "ewald", "direct")
CHARGE_SOURCES = ("request", "model", "qeq")
CHARGE_SUM_TOLERANCE = 1e-6  # e


class _ChargeSolution(Protocol):
    charges: np.ndarray  # (n,) e

    def adjoint(self, gradient: torch.Tensor) -> torch.Tensor: ...


class _ChargeModel(Protocol):
    """What the Coulomb correction needs of charges computed from the positions (QEq's), for their
    values and their response to the positions."""

    def solve(self, systems: Sequence[System]) -> Sequence[_ChargeSolution]: ...

    def interaction(self, system: System, geometry: Geometry, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def release_pairs(self) -> None: ...


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
        qeq: _ChargeModel | None = None,
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
            qeq = self._default_qeq()
        self.qeq = qeq

    def _default_qeq(self) -> _ChargeModel:
        """The QEq behind charges="qeq" when none is passed. This module cannot build one (QEq builds on
        the same kernels and is not imported here); ``qeq_corrections.Electrostatics`` does."""
        raise ValueError("charges='qeq' needs the QEq that computes them: pass qeq=, or use "
                         "mlipserve.physics.qeq_corrections.Electrostatics")

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
        self, system: System, geometry: Geometry, q: torch.Tensor, energy: torch.Tensor, solution: _ChargeSolution
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

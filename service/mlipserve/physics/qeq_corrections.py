"""QEq in the corrections: the Coulomb correction with QEq as its charge source, what the service
builds for every electrostatics correction, and the QEq model's own energy.

The energy and forces of the QEq model itself (``QEqCorrection``) use the Hellmann-Feynman theorem:
E is stationary in q on the constraint, so dE/dr is taken at fixed q.
"""

from __future__ import annotations

import torch

from mlipserve.backends.base import Batch
from mlipserve.physics import electrostatics
from mlipserve.physics.base import CorrectionResult
from mlipserve.physics.coulomb import DTYPE, Geometry, results_from_energies, wants
from mlipserve.physics.qeq import QEq


class Electrostatics(electrostatics.Electrostatics):
    """The Coulomb correction (``mlipserve.physics.electrostatics``) where charges="qeq" without a
    ``qeq`` get a QEq of the same accuracy, Ewald/PME split and device: the one place that chooses
    QEq as a charge source."""

    def _default_qeq(self) -> QEq:
        return QEq(accuracy=self.accuracy, ewald_max_atoms=self.ewald_max_atoms, device=str(self.device))


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

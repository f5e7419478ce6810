"""The interface of a physics correction: a term added to a model's energy, with its own forces and
stress (by autograd), evaluated for a whole Batch at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from mlipserve.backends.base import Batch


@dataclass(eq=False)
class CorrectionResult:
    """One system's share of a correction. Units: eV, eV/Å, eV/Å³ (Voigt xx yy zz yz xz xy, ASE sign)."""

    energy: float
    forces: np.ndarray | None = None  # (n, 3); None when forces were not requested
    stress: np.ndarray | None = None  # (6,); None without a cell or when not requested
    charges: np.ndarray | None = None  # (n,) e: the charges the correction used, where it used any


@runtime_checkable
class Correction(Protocol):
    """A physics term evaluated on a batch. ``name`` is what responses report (e.g. "pme",
    "d3(bj)-pbe")."""

    @property
    def name(self) -> str: ...

    def compute(self, batch: Batch, model_charges: Sequence[np.ndarray | None] | None = None) -> list[CorrectionResult]:
        """One result per system of ``batch``, honouring ``batch.properties`` (energy always;
        forces/stress when asked). ``model_charges``: per-system charges the model predicted, for
        corrections that can take them."""
        ...

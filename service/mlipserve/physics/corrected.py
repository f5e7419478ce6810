"""A model plus the physics corrections a batch asks for: one evaluate function for the batcher.

The model runs first (asked for its charges when an electrostatics correction takes them from the
model); each correction then runs on the whole batch and adds its energy, forces and stress. Results
report every correction's energy by name; per-atom energies stay the model's own. An observer
hears how long the model and the corrections of each evaluation took (metrics).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

from mlipserve.backends.base import Batch
from mlipserve.physics.base import Correction as PhysicsCorrection
from mlipserve_client.types import Correction, Dispersion, Electrostatics, ModelInfo, Property, Result


class EvaluationObserver(Protocol):
    def evaluated(self, model_s: float, corrections_s: float | None) -> None:
        """One batch evaluated: the model's time and its corrections' (None: it asked for none)."""
        ...


class CorrectedEvaluator:
    """``evaluate`` (a model's batch evaluation) plus ``batch.corrections``. Corrections are built
    once per specification and kept, so their tuned parameters are reused across batches."""

    def __init__(self, evaluate: Callable[[Batch], list[Result]], info: ModelInfo, device: str,
                 observer: EvaluationObserver | None = None) -> None:
        self._evaluate = evaluate
        self._info = info
        self._device = device
        self._observer = observer
        self._built: dict[Correction, PhysicsCorrection] = {}

    def __call__(self, batch: Batch) -> list[Result]:
        start = time.perf_counter()
        if not batch.corrections:
            results = self._evaluate(batch)
            if self._observer is not None:
                self._observer.evaluated(time.perf_counter() - start, None)
            return results
        from_model = any(isinstance(c, Electrostatics) and c.charges == "model" for c in batch.corrections)
        # The model is asked for charges only when a correction takes them from it; otherwise the
        # charges a batch asks for are the ones the electrostatics correction reports.
        properties = (batch.properties - {Property.CHARGES}) | ({Property.CHARGES} if from_model else set())
        results = self._evaluate(dataclasses.replace(batch, properties=frozenset(properties), corrections=()))
        model_done = time.perf_counter()
        model_charges = [r.charges for r in results] if from_model else None
        for spec in batch.corrections:
            terms = self._correction(spec).compute(batch, model_charges)
            for result, term in zip(results, terms, strict=True):
                result.corrections[spec.name] = term.energy
                if result.energy is not None:
                    result.energy += term.energy
                if result.forces is not None and term.forces is not None:
                    result.forces = result.forces + term.forces
                if result.stress is not None and term.stress is not None:
                    result.stress = result.stress + term.stress
                if term.charges is not None:
                    result.charges = term.charges
        if self._observer is not None:
            self._observer.evaluated(model_done - start, time.perf_counter() - model_done)
        return results

    def _correction(self, spec: Correction) -> PhysicsCorrection:
        if spec not in self._built:
            self._built[spec] = build_correction(spec, self._info.cutoff, self._device)
        return self._built[spec]


def build_correction(spec: Correction, model_cutoff: float, device: str) -> PhysicsCorrection:
    """The physics object of a correction specification (mlipserve_client.types)."""
    if isinstance(spec, Electrostatics):
        # Not electrostatics' own class: this one builds the QEq that charges="qeq" come from.
        from mlipserve.physics.qeq_corrections import Electrostatics as Coulomb

        radius = model_cutoff if spec.exclusion_radius is None else spec.exclusion_radius
        # A smooth 1 Å switch keeps MD energies continuous as pairs cross the exclusion radius.
        return Coulomb(charges=spec.charges, method=spec.method, exclusion_radius=radius or None,
                       exclusion_width=min(1.0, radius), device=device)
    if isinstance(spec, Dispersion):
        from mlipserve.physics.dispersion import DEFAULT_CUTOFF, D3Dispersion

        return D3Dispersion(spec.functional, spec.damping, cutoff=spec.cutoff or DEFAULT_CUTOFF, device=device)
    raise TypeError(f"unknown correction {spec!r}")

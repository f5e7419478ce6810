"""Which corrections a request gets, checked before any model runs (no torch: the front door uses it).

A model id may bake corrections in (ModelConfig.corrections, e.g. "mace-small+pme+d3"); a request may
add more. Each kind applies at most once. An electrostatics correction whose charges are "auto" is
resolved here to the first available source: the request's per-atom charges, the model's own, QEq.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mlipserve.errors import InvalidSystemError
from mlipserve.physics.d3_parameters import damping_parameters
from mlipserve_client.types import Correction, Dispersion, Electrostatics, ModelInfo, Property, System

_KINDS = {Electrostatics: "electrostatics", Dispersion: "dispersion"}
# D3 reference data covers H-Pu.
_D3_MAX_Z = 94


def resolve_corrections(info: ModelInfo, requested: Sequence[Correction], systems: Sequence[System]) -> tuple[Correction, ...]:
    """The model's own corrections then the request's, validated, with "auto" charges resolved."""
    resolved: list[Correction] = []
    seen: dict[str, Correction] = {}
    for where, correction in [("model", c) for c in info.corrections] + [
            (f"corrections[{i}]", c) for i, c in enumerate(requested)]:
        kind = _KINDS[type(correction)]
        if kind in seen:
            raise InvalidSystemError(where, f"{kind} is already applied ({seen[kind].name}"
                                            f"{' by model ' + repr(info.id) if where != 'model' else ''}); "
                                            "each correction applies once")
        if isinstance(correction, Electrostatics):
            correction = _resolve_electrostatics(info, correction, systems, where)
        else:
            _check_dispersion(correction, systems, where)
        seen[kind] = correction
        resolved.append(correction)
    return tuple(resolved)


def _resolve_electrostatics(info: ModelInfo, spec: Electrostatics, systems: Sequence[System], where: str) -> Electrostatics:
    has_model_charges = Property.CHARGES in info.properties
    charges = spec.charges
    if charges == "auto":
        if all(s.atomic_charges is not None for s in systems):
            charges = "request"
        else:
            charges = "model" if has_model_charges else "qeq"
    if charges == "request":
        for i, system in enumerate(systems):
            if system.atomic_charges is None:
                raise InvalidSystemError(f"systems[{i}].atomic_charges",
                                         "electrostatics with charges from the request needs a charge per atom")
    if charges == "model" and not has_model_charges:
        raise InvalidSystemError(f"{where}.electrostatics.charges",
                                 f"model {info.id!r} does not predict charges; use the request's or QEq")
    for i, system in enumerate(systems):
        periodic = system.pbc.all()
        if system.is_periodic and not periodic:
            raise InvalidSystemError(f"systems[{i}].pbc", "electrostatics needs a system periodic along all three "
                                                          "axes or none (slabs are not supported yet)")
        if spec.method in ("pme", "ewald") and not periodic:
            raise InvalidSystemError(f"{where}.electrostatics.method",
                                     f"{spec.method} needs a periodic system; systems[{i}] is not (use auto or direct)")
        if spec.method == "direct" and periodic:
            raise InvalidSystemError(f"{where}.electrostatics.method",
                                     f"direct summation diverges for a periodic system (systems[{i}]); use auto, pme or ewald")
    return dataclasses.replace(spec, charges=charges)


def _check_dispersion(spec: Dispersion, systems: Sequence[System], where: str) -> None:
    try:
        damping_parameters(spec.functional, spec.damping)
    except ValueError as error:
        raise InvalidSystemError(f"{where}.dispersion", str(error)) from None
    for i, system in enumerate(systems):
        beyond = system.numbers > _D3_MAX_Z
        if beyond.any():
            atom = int(beyond.argmax())
            raise InvalidSystemError(f"systems[{i}].atomic_numbers[{atom}]",
                                     f"D3 has no reference data for atomic number {system.numbers[atom]} (atom {atom})")

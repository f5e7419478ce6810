"""The one place where ASE Atoms, typed systems and protobuf messages are converted into each other.

Both the client and the server use it, so that what the client sends is exactly what the server reads.
Parsing a message validates it: shape errors and non-physical values raise InvalidSystemError naming
the field (``systems[2].positions[5]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from ase import Atoms

from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import (
    ARRAY_PROPERTIES,
    DEFAULT_PROPERTIES,
    ComputeRequest,
    Correction,
    Dispersion,
    Electrostatics,
    ModelInfo,
    ModelStatus,
    Property,
    Result,
    System,
)
from mlipserve_client.v1 import compute_pb2, models_pb2, system_pb2
from mlipserve_client.validation import validate_system

_PROPERTY_TO_PROTO = {
    Property.ENERGY: compute_pb2.PROPERTY_ENERGY,
    Property.FORCES: compute_pb2.PROPERTY_FORCES,
    Property.STRESS: compute_pb2.PROPERTY_STRESS,
    Property.ENERGIES: compute_pb2.PROPERTY_ENERGIES,
    Property.MAGMOMS: compute_pb2.PROPERTY_MAGMOMS,
    Property.CHARGES: compute_pb2.PROPERTY_CHARGES,
}
_PROPERTY_FROM_PROTO = {v: k for k, v in _PROPERTY_TO_PROTO.items()}
_STATUS_TO_PROTO = {
    ModelStatus.AVAILABLE: models_pb2.MODEL_STATUS_AVAILABLE,
    ModelStatus.LOADING: models_pb2.MODEL_STATUS_LOADING,
    ModelStatus.UNAVAILABLE: models_pb2.MODEL_STATUS_UNAVAILABLE,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}
_METHODS = {"auto": compute_pb2.ELECTROSTATICS_METHOD_UNSPECIFIED, "pme": compute_pb2.ELECTROSTATICS_METHOD_PME,
            "ewald": compute_pb2.ELECTROSTATICS_METHOD_EWALD, "direct": compute_pb2.ELECTROSTATICS_METHOD_DIRECT}
_CHARGES = {"auto": compute_pb2.CHARGE_SOURCE_UNSPECIFIED, "request": compute_pb2.CHARGE_SOURCE_REQUEST,
            "model": compute_pb2.CHARGE_SOURCE_MODEL, "qeq": compute_pb2.CHARGE_SOURCE_QEQ}
_DAMPING = {"bj": compute_pb2.DISPERSION_DAMPING_BJ, "zero": compute_pb2.DISPERSION_DAMPING_ZERO}
_METHODS_FROM = {v: k for k, v in _METHODS.items()}
_CHARGES_FROM = {v: k for k, v in _CHARGES.items()}
_DAMPING_FROM = {compute_pb2.DISPERSION_DAMPING_UNSPECIFIED: "bj", **{v: k for k, v in _DAMPING.items()}}


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# --- ASE Atoms <-> System ------------------------------------------------------------------------


def system_from_atoms(atoms: Atoms) -> System:
    """A System from ASE Atoms. A cell of rank < 3 on a non-periodic system means "no cell".

    ``atoms.info["charge"]`` and ``atoms.info["spin"]`` (multiplicity) carry the total charge and
    spin, as in fairchem's convention; per-atom charges travel when set with
    ``atoms.set_initial_charges``.
    """
    pbc = np.array(atoms.pbc, dtype=bool)
    cell = None
    if atoms.cell.rank == 3 or pbc.any():
        cell = _readonly(np.array(atoms.cell.array, dtype=np.float64))
    return System(
        numbers=_readonly(np.array(atoms.numbers, dtype=np.int64)),
        positions=_readonly(np.array(atoms.positions, dtype=np.float64)),
        cell=cell,
        pbc=_readonly(pbc),
        total_charge=float(atoms.info.get("charge", 0.0)),
        spin_multiplicity=int(atoms.info.get("spin", 0)),
        atomic_charges=(_readonly(np.array(atoms.get_initial_charges(), dtype=np.float64))
                        if atoms.has("initial_charges") else None),
    )


def atoms_from_system(system: System) -> Atoms:
    atoms = Atoms(
        numbers=system.numbers,
        positions=system.positions,
        cell=system.cell if system.cell is not None else np.zeros((3, 3)),
        pbc=system.pbc,
        charges=system.atomic_charges,
    )
    if system.total_charge:
        atoms.info["charge"] = system.total_charge
    if system.spin_multiplicity:
        atoms.info["spin"] = system.spin_multiplicity
    return atoms


# --- System <-> proto ----------------------------------------------------------------------------


def system_to_proto(system: System) -> system_pb2.System:
    return system_pb2.System(
        atomic_numbers=system.numbers.tolist(),
        positions=system.positions.ravel().tolist(),
        cell=[] if system.cell is None else system.cell.ravel().tolist(),
        pbc=system.pbc.tolist(),
        total_charge=system.total_charge,
        spin_multiplicity=system.spin_multiplicity,
        atomic_charges=[] if system.atomic_charges is None else system.atomic_charges.tolist(),
    )


def system_from_proto(message: system_pb2.System, where: str = "system") -> System:
    """Parse and validate one System message; ``where`` prefixes field names in errors."""
    numbers = np.asarray(message.atomic_numbers, dtype=np.int64)
    n = len(numbers)
    if n == 0:
        raise InvalidSystemError(f"{where}.atomic_numbers", "the system has no atoms")
    positions = np.asarray(message.positions, dtype=np.float64)
    if positions.size != 3 * n:
        raise InvalidSystemError(
            f"{where}.positions",
            f"has {positions.size} values, but {n} atoms need 3 x {n} = {3 * n} (x, y, z per atom)",
        )
    cell = np.asarray(message.cell, dtype=np.float64)
    if cell.size not in (0, 9):
        raise InvalidSystemError(f"{where}.cell", f"has {cell.size} values; give 9 (a 3x3 matrix) or none")
    pbc = np.asarray(message.pbc, dtype=bool)
    if pbc.size not in (0, 3):
        raise InvalidSystemError(f"{where}.pbc", f"has {pbc.size} values; give 3 (one per cell vector) or none")
    charges = np.asarray(message.atomic_charges, dtype=np.float64)
    if charges.size not in (0, n):
        raise InvalidSystemError(f"{where}.atomic_charges", f"has {charges.size} values; give one per atom ({n}) or none")
    system = System(
        numbers=_readonly(numbers),
        positions=_readonly(positions.reshape(n, 3)),
        cell=_readonly(cell.reshape(3, 3)) if cell.size else None,
        pbc=_readonly(pbc if pbc.size else np.zeros(3, dtype=bool)),
        total_charge=float(message.total_charge),
        spin_multiplicity=int(message.spin_multiplicity),
        atomic_charges=_readonly(charges) if charges.size else None,
    )
    validate_system(system, where)
    return system


def system_moved(system: System, positions: Sequence[float], cell: Sequence[float], where: str = "step") -> System:
    """``system`` at new positions (and, when ``cell`` is not empty, a new cell): one step of an MD
    session, whose species, pbc, charge and spin stay those of the session. Validated like a whole
    system (a step's NaN or a collapsed cell is refused by field)."""
    n = system.n_atoms
    # Copies: the caller's arrays (ASE's, say) may change in place after this step.
    moved = np.array(positions, dtype=np.float64)
    if moved.size != 3 * n:
        raise InvalidSystemError(f"{where}.positions",
                                 f"has {moved.size} values, but the session's {n} atoms need {3 * n}")
    new_cell = system.cell
    if len(cell):
        new_cell = np.array(cell, dtype=np.float64)
        if new_cell.size != 9:
            raise InvalidSystemError(f"{where}.cell", f"has {new_cell.size} values; give 9 (a 3x3 matrix) or none")
        new_cell = _readonly(new_cell.reshape(3, 3))
    stepped = System(numbers=system.numbers, positions=_readonly(moved.reshape(n, 3)), cell=new_cell, pbc=system.pbc,
                     total_charge=system.total_charge, spin_multiplicity=system.spin_multiplicity,
                     atomic_charges=system.atomic_charges)
    validate_system(stepped, where)
    return stepped


# --- requests ------------------------------------------------------------------------------------


def properties_to_proto(properties: Iterable[Property | str]) -> list[int]:
    wanted = {Property(p) for p in properties}
    return [_PROPERTY_TO_PROTO[p] for p in Property if p in wanted]


def properties_from_proto(values: Sequence[int]) -> frozenset[Property]:
    if not values:
        return DEFAULT_PROPERTIES
    out = set()
    for i, value in enumerate(values):
        if value not in _PROPERTY_FROM_PROTO:
            known = ", ".join(compute_pb2.Property.Name(v) for v in _PROPERTY_FROM_PROTO)
            raise InvalidSystemError(f"properties[{i}]", f"unknown property {value}; known: {known}")
        out.add(_PROPERTY_FROM_PROTO[value])
    return frozenset(out)


def correction_to_proto(correction: Correction) -> compute_pb2.Correction:
    if isinstance(correction, Electrostatics):
        message = compute_pb2.Electrostatics(method=_METHODS[correction.method], charges=_CHARGES[correction.charges])
        if correction.exclusion_radius is not None:
            message.exclusion_radius = correction.exclusion_radius
        return compute_pb2.Correction(electrostatics=message)
    message = compute_pb2.Dispersion(functional=correction.functional, damping=_DAMPING[correction.damping])
    if correction.cutoff is not None:
        message.cutoff = correction.cutoff
    return compute_pb2.Correction(dispersion=message)


def _name_of(table: dict[int, str], value: int, field: str) -> str:
    if value not in table:
        raise InvalidSystemError(field, f"unknown value {value}; known: {', '.join(sorted(set(table.values())))}")
    return table[value]


def correction_from_proto(message: compute_pb2.Correction, where: str) -> Correction:
    kind = message.WhichOneof("kind")
    if kind == "electrostatics":
        e = message.electrostatics
        radius = e.exclusion_radius if e.HasField("exclusion_radius") else None
        if radius is not None and not (np.isfinite(radius) and radius >= 0):
            raise InvalidSystemError(f"{where}.electrostatics.exclusion_radius", f"must be >= 0 Å, got {radius}")
        return Electrostatics(method=_name_of(_METHODS_FROM, e.method, f"{where}.electrostatics.method"),
                              charges=_name_of(_CHARGES_FROM, e.charges, f"{where}.electrostatics.charges"),
                              exclusion_radius=radius)
    if kind == "dispersion":
        d = message.dispersion
        cutoff = d.cutoff if d.HasField("cutoff") else None
        if cutoff is not None and not (np.isfinite(cutoff) and cutoff > 0):
            raise InvalidSystemError(f"{where}.dispersion.cutoff", f"must be > 0 Å, got {cutoff}")
        return Dispersion(functional=d.functional.lower() or "pbe",
                          damping=_name_of(_DAMPING_FROM, d.damping, f"{where}.dispersion.damping"), cutoff=cutoff)
    raise InvalidSystemError(where, "a correction must be electrostatics or dispersion")


def compute_request_to_proto(request: ComputeRequest) -> compute_pb2.ComputeRequest:
    return compute_pb2.ComputeRequest(
        model=request.model,
        systems=[system_to_proto(s) for s in request.systems],
        properties=properties_to_proto(request.properties),
        task=request.task,
        corrections=[correction_to_proto(c) for c in request.corrections],
    )


def compute_request_from_proto(message: compute_pb2.ComputeRequest) -> ComputeRequest:
    if not message.model:
        raise InvalidSystemError("model", "no model id given; ListModels shows the available ones")
    if not message.systems:
        raise InvalidSystemError("systems", "the request has no systems")
    return ComputeRequest(
        model=message.model,
        systems=tuple(system_from_proto(s, f"systems[{i}]") for i, s in enumerate(message.systems)),
        properties=properties_from_proto(message.properties),
        task=message.task,
        corrections=tuple(correction_from_proto(c, f"corrections[{i}]") for i, c in enumerate(message.corrections)),
    )


# --- results -------------------------------------------------------------------------------------


def result_to_proto(result: Result) -> compute_pb2.SystemResult:
    message = compute_pb2.SystemResult(
        corrections=[compute_pb2.CorrectionTerm(name=k, energy=v) for k, v in result.corrections.items()])
    if result.energy is not None:
        message.energy = float(result.energy)
    for name in ARRAY_PROPERTIES:
        value = getattr(result, name)
        if value is not None:
            getattr(message, name).extend(np.asarray(value, dtype=np.float64).ravel().tolist())
    return message


def result_from_proto(message: compute_pb2.SystemResult, n_atoms: int) -> Result:
    def array(values, shape):
        return np.asarray(values, dtype=np.float64).reshape(shape) if len(values) else None

    shapes = {"forces": (n_atoms, 3), "stress": (6,), "energies": (n_atoms,), "magmoms": (n_atoms,),
              "charges": (n_atoms,)}
    return Result(
        energy=message.energy if message.HasField("energy") else None,
        corrections={term.name: term.energy for term in message.corrections},
        **{name: array(getattr(message, name), shapes[name]) for name in ARRAY_PROPERTIES},
    )


# --- model metadata ------------------------------------------------------------------------------


def model_info_to_proto(info: ModelInfo) -> models_pb2.ModelInfo:
    return models_pb2.ModelInfo(
        id=info.id,
        architecture=info.architecture,
        version=info.version,
        cutoff=info.cutoff,
        elements=list(info.elements),
        dtype=info.dtype,
        device=info.device,
        num_parameters=info.num_parameters,
        training_data=info.training_data,
        license=info.license,
        trained=info.trained,
        properties=properties_to_proto(info.properties),
        uses_total_charge=info.uses_total_charge,
        uses_spin=info.uses_spin,
        status=_STATUS_TO_PROTO[info.status],
        status_message=info.status_message,
        tasks=list(info.tasks),
        default_task=info.default_task,
        corrections=[correction_to_proto(c) for c in info.corrections],
    )


def model_info_from_proto(message: models_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=message.id,
        architecture=message.architecture,
        version=message.version,
        cutoff=message.cutoff,
        elements=tuple(message.elements),
        dtype=message.dtype,
        device=message.device,
        num_parameters=message.num_parameters,
        training_data=message.training_data,
        license=message.license,
        trained=message.trained,
        properties=frozenset(_PROPERTY_FROM_PROTO[p] for p in message.properties if p in _PROPERTY_FROM_PROTO),
        uses_total_charge=message.uses_total_charge,
        uses_spin=message.uses_spin,
        status=_STATUS_FROM_PROTO.get(message.status, ModelStatus.UNAVAILABLE),
        status_message=message.status_message,
        tasks=tuple(message.tasks),
        default_task=message.default_task,
        corrections=tuple(correction_from_proto(c, f"corrections[{i}]") for i, c in enumerate(message.corrections)),
    )

"""Workflow options, results and events <-> their mlipserve.v1 messages (workflows.proto).

The one place for them, used by the client and the server alike, next to ``convert`` (which stays
the one place for systems and per-evaluation results: a relaxed structure travels as a System with
a SystemResult). Most fields carry the same name in the dataclass and the message and are copied
by name; what differs (nested messages, the optimizer enum, arrays' shapes) is spelled out here.
Options read from a message take their defaults where a field is unset, then validate themselves
(InvalidSystemError naming ``options.<field>``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import numpy as np
from google.protobuf.message import Message

from mlipserve_client import convert
from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import Correction, Result, System
from mlipserve_client.v1 import system_pb2
from mlipserve_client.v1 import workflows_pb2 as pb
from mlipserve_client.workflow_types import (
    DiatomicChecks,
    DiatomicOptions,
    DiatomicResult,
    ElasticOptions,
    ElasticResult,
    EOSOptions,
    EOSResult,
    PhononOptions,
    PhononResult,
    RelaxOptions,
    RelaxResult,
    StructureError,
    StructureProgress,
    StructureResult,
    WorkflowEvent,
    WorkflowOptions,
    WorkflowProgress,
    WorkflowResult,
    WorkflowSummary,
    from_plain,
)

# RPC name -> (its request message, the options type that selects the workflow).
RPCS: dict[str, tuple[type[Message], type]] = {
    "Relax": (pb.RelaxRequest, RelaxOptions),
    "EquationOfState": (pb.EquationOfStateRequest, EOSOptions),
    "Elastic": (pb.ElasticRequest, ElasticOptions),
    "Phonons": (pb.PhononsRequest, PhononOptions),
    "Diatomics": (pb.DiatomicsRequest, DiatomicOptions),
}
RPC_OF = {options: rpc for rpc, (_, options) in RPCS.items()}
_OPTION_MESSAGES = {RelaxOptions: pb.RelaxOptions, EOSOptions: pb.EOSOptions, ElasticOptions: pb.ElasticOptions,
                    PhononOptions: pb.PhononOptions, DiatomicOptions: pb.DiatomicOptions}
_OPTION_TYPES = {message: options for options, message in _OPTION_MESSAGES.items()}
_OPTIMIZERS = {"FIRE": pb.OPTIMIZER_FIRE, "BFGS": pb.OPTIMIZER_BFGS}
_OPTIMIZERS_FROM = {pb.OPTIMIZER_UNSPECIFIED: "FIRE", **{v: k for k, v in _OPTIMIZERS.items()}}
# The StructureResult oneof's field for each result type.
_RESULT_FIELDS = {RelaxResult: "relax", EOSResult: "eos", ElasticResult: "elastic", PhononResult: "phonons",
                  DiatomicResult: "diatomic"}
_RELAXED_STRUCTURE = ("numbers", "positions", "cell", "pbc", "energy", "forces", "stress")


# --- by name ------------------------------------------------------------------------------------


def _wire(value):
    if isinstance(value, np.ndarray):
        return value.ravel().tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return value


def _fill(message: Message, record, skip: Sequence[str] = ()) -> Message:
    """``message`` with the fields of ``record`` that it has by the same name (None: left unset)."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name in skip or value is None or not f.metadata.get("json", True):
            continue
        value = _wire(value)
        if isinstance(value, list):
            getattr(message, f.name).extend(value)
        else:
            setattr(message, f.name, value)
    return message


def _read(message: Message, cls: type, *, defaults: bool = False, shapes: dict[str, tuple] | None = None, **given):
    """``cls`` from the fields of ``message`` of the same names, ``given`` for the others. An unset
    optional field is None, or with ``defaults`` the dataclass default (as is an empty repeated one)."""
    hints = typing.get_type_hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values or not f.metadata.get("json", True):
            continue
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        raw = getattr(message, f.name)
        unset = (not len(raw)) if descriptor.is_repeated else descriptor.has_presence and not message.HasField(f.name)
        if unset and defaults:
            continue
        value = from_plain(hints[f.name], None if unset and not descriptor.is_repeated else
                           list(raw) if descriptor.is_repeated else raw)
        if shapes and f.name in shapes:
            value = value.reshape(shapes[f.name])
        values[f.name] = value
    return cls(**values)


# --- options ------------------------------------------------------------------------------------


def options_to_proto(options: WorkflowOptions) -> Message:
    message = _fill(_OPTION_MESSAGES[type(options)](), options, skip=("relax", "optimizer"))
    if isinstance(options, RelaxOptions):
        message.optimizer = _OPTIMIZERS[options.optimizer]
    elif hasattr(options, "relax"):
        if options.relax is None:
            message.skip_relax = True
        else:
            message.relax.CopyFrom(options_to_proto(options.relax))
    return message


def options_from_proto(message: Message, where: str = "options") -> WorkflowOptions:
    cls = _OPTION_TYPES[type(message)]
    given = {}
    if cls is RelaxOptions:
        if message.optimizer not in _OPTIMIZERS_FROM:
            raise InvalidSystemError(f"{where}.optimizer", f"unknown value {message.optimizer}; known: "
                                                           f"{', '.join(pb.Optimizer.keys())}")
        given["optimizer"] = _OPTIMIZERS_FROM[message.optimizer]
    elif "relax" in cls.__dataclass_fields__:
        given["relax"] = None if message.skip_relax else options_from_proto(message.relax, f"{where}.relax")
    try:
        return _read(message, cls, defaults=True, **given)
    except InvalidSystemError as error:  # the options name themselves "options.<field>"
        raise InvalidSystemError(where + error.field.removeprefix("options"), error.message) from None


# --- results ------------------------------------------------------------------------------------


def _relax_to_proto(result: RelaxResult) -> pb.RelaxResult:
    structure = convert.system_to_proto(System(numbers=result.numbers, positions=result.positions, cell=result.cell,
                                               pbc=result.pbc))
    evaluation = convert.result_to_proto(Result(energy=result.energy, forces=result.forces, stress=result.stress))
    return _fill(pb.RelaxResult(structure=structure, result=evaluation), result, skip=_RELAXED_STRUCTURE)


def _relax_from_proto(message: pb.RelaxResult) -> RelaxResult:
    system = convert.system_from_proto(message.structure, "relaxed.structure")
    evaluation = convert.result_from_proto(message.result, system.n_atoms)
    return _read(message, RelaxResult, numbers=system.numbers, positions=system.positions, cell=system.cell,
                 pbc=system.pbc, energy=evaluation.energy, forces=evaluation.forces, stress=evaluation.stress)


def _relaxed(result) -> dict:
    return {"relaxed": _relax_to_proto(result.relaxed)} if result.relaxed is not None else {}


def _relaxed_from(message) -> RelaxResult | None:
    return _relax_from_proto(message.relaxed) if message.HasField("relaxed") else None


def result_to_proto(result: WorkflowResult) -> Message:
    if isinstance(result, RelaxResult):
        return _relax_to_proto(result)
    if isinstance(result, EOSResult | ElasticResult):
        message_type = pb.EOSResult if isinstance(result, EOSResult) else pb.ElasticResult
        return _fill(message_type(**_relaxed(result)), result, skip=("relaxed",))
    if isinstance(result, PhononResult):
        bands = [pb.PhononBand(distances=_wire(d), frequencies_thz=_wire(f))
                 for d, f in zip(result.band_distances, result.band_frequencies_thz, strict=True)]
        return _fill(pb.PhononResult(bands=bands, **_relaxed(result)), result,
                     skip=("relaxed", "band_distances", "band_frequencies_thz"))
    return _fill(pb.DiatomicResult(checks=_fill(pb.DiatomicChecks(), result.checks)), result, skip=("checks",))


def result_from_proto(message: Message) -> WorkflowResult:
    if isinstance(message, pb.RelaxResult):
        return _relax_from_proto(message)
    if isinstance(message, pb.EOSResult):
        return _read(message, EOSResult, relaxed=_relaxed_from(message))
    if isinstance(message, pb.ElasticResult):
        return _read(message, ElasticResult, relaxed=_relaxed_from(message),
                     shapes={"tensor_gpa": (6, 6), "strains": (-1, 6), "stresses_gpa": (-1, 6)})
    if isinstance(message, pb.PhononResult):
        distances = [np.asarray(b.distances, dtype=np.float64) for b in message.bands]
        frequencies = [np.asarray(b.frequencies_thz, dtype=np.float64).reshape(len(d), -1)
                       for b, d in zip(message.bands, distances, strict=True)]
        return _read(message, PhononResult, relaxed=_relaxed_from(message), band_distances=distances,
                     band_frequencies_thz=frequencies, shapes={"supercell": (3, 3)})
    return _read(message, DiatomicResult, checks=_read(message.checks, DiatomicChecks))


# --- events -------------------------------------------------------------------------------------


def event_to_proto(event: WorkflowEvent) -> pb.WorkflowEvent:
    if isinstance(event, WorkflowProgress):
        progress = _fill(pb.WorkflowProgress(), event, skip=("structures",))
        progress.structures.extend(_fill(pb.StructureProgress(), s) for s in event.structures)
        return pb.WorkflowEvent(progress=progress)
    if isinstance(event, StructureResult):
        result = pb.StructureResult(index=event.index)
        getattr(result, _RESULT_FIELDS[type(event.result)]).CopyFrom(result_to_proto(event.result))
        return pb.WorkflowEvent(result=result)
    if isinstance(event, StructureError):
        return pb.WorkflowEvent(error=_fill(pb.StructureError(), event))
    return pb.WorkflowEvent(summary=_fill(pb.WorkflowSummary(), event))


def event_from_proto(message: pb.WorkflowEvent) -> WorkflowEvent:
    kind = message.WhichOneof("kind")
    if kind == "progress":
        structures = tuple(_read(s, StructureProgress) for s in message.progress.structures)
        return _read(message.progress, WorkflowProgress, structures=structures)
    if kind == "result":
        field = message.result.WhichOneof("result")
        if field is None:
            raise InvalidSystemError("result", "a StructureResult without a result")
        return StructureResult(message.result.index, result_from_proto(getattr(message.result, field)))
    if kind == "error":
        return _read(message.error, StructureError)
    if kind == "summary":
        return _read(message.summary, WorkflowSummary)
    raise InvalidSystemError("event", "an empty WorkflowEvent")


# --- requests -----------------------------------------------------------------------------------


def workflow_request(options: WorkflowOptions, structures: Sequence[system_pb2.System], *, model: str,
                     task: str = "", corrections: Sequence[Correction] = (), elements: Sequence[str] = (),
                     heteronuclear: bool = False) -> tuple[str, Message]:
    """(RPC name, request) of the workflow ``options`` select; ``elements`` for Diatomics only."""
    rpc = RPC_OF[type(options)]
    request = RPCS[rpc][0](model=model, structures=structures, task=task, options=options_to_proto(options),
                           corrections=[convert.correction_to_proto(c) for c in corrections])
    if elements or heteronuclear:
        request.elements.extend(elements)
        request.heteronuclear = heteronuclear
    return rpc, request


def request_options(request: Message) -> WorkflowOptions:
    """The options of a workflow request (their defaults where unset), validated."""
    return options_from_proto(request.options)


def request_corrections(request: Message) -> tuple[Correction, ...]:
    return tuple(convert.correction_from_proto(c, f"corrections[{i}]") for i, c in enumerate(request.corrections))

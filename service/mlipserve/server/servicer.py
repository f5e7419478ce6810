"""mlipserve.v1.MLIPService on grpc.aio: every byte a client sends gets a deliberate status.

The handlers take the raw request bytes and decode them here (gRPC's own deserializer would answer
a truncated message with INTERNAL or UNKNOWN), check the size limits on the decoded message before
building any array, parse and validate through mlipserve_client.convert (the one proto <-> array
conversion), check the request against the model, and hand a typed request to the Engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from mlipserve.backends.base import check_request
from mlipserve.config import Limits
from mlipserve.corrections import resolve_corrections
from mlipserve.errors import InvalidSystemError, ModelUnavailableError, ServerDrainingError
from mlipserve.server.auth import current_principal
from mlipserve.server.engine import Engine
from mlipserve.server.limits import check_compute_limits, check_message_size, check_model_id
from mlipserve.server.observer import NO_MODEL, NO_OBSERVER, Call, Calls, RequestObserver, code_name
from mlipserve.status import abort
from mlipserve_client import convert
from mlipserve_client.types import ComputeRequest, Electrostatics, ModelInfo, ModelStatus, Property
from mlipserve_client.v1 import compute_pb2, models_pb2

# Parsing, validating and serializing a request this large takes tens of ms: off the event loop,
# so that the small requests of other clients are not held up behind it.
OFFLOAD_ATOMS = 20_000

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]
Method = Callable[[bytes, grpc.aio.ServicerContext, Call], Awaitable[bytes]]


def decode(message_type: type[Message], raw: bytes) -> Message:
    try:
        return message_type.FromString(raw)
    except DecodeError as error:
        raise InvalidSystemError(
            "request", f"{len(raw)} bytes that are not a valid {message_type.DESCRIPTOR.full_name} message "
                       f"(truncated, or not protobuf): {error}") from None


def prepare(info: ModelInfo, compute: ComputeRequest, limits: Limits) -> ComputeRequest:
    """``compute`` checked against the model, with its corrections resolved. The one place requests
    are checked against the model: a bad request never reaches it."""
    # Electrostatics (asked for or baked in) provides charges whether or not the model has them.
    with_charges = any(isinstance(c, Electrostatics) for c in (*info.corrections, *compute.corrections))
    from_model = compute.properties - {Property.CHARGES} if with_charges else compute.properties
    check_request(info, compute.systems, from_model, compute.task, limits.max_neighbours_per_atom)
    corrections = resolve_corrections(info, compute.corrections, compute.systems)
    # The charges electrostatics used come back with every result.
    properties = compute.properties | {Property.CHARGES} if with_charges else compute.properties
    return dataclasses.replace(compute, properties=properties, corrections=corrections)


async def _off_loop_if(big: bool, function, *args):
    return await asyncio.to_thread(function, *args) if big else function(*args)


@contextlib.asynccontextmanager
async def reported(context: grpc.aio.ServicerContext, call: Call, drained: Callable[[], bool] = lambda: False):
    """The outcome of an RPC handler's block: every exception becomes its mapped status
    (mlipserve.status), and the call is observed with the code it ended with. A cancellation is the
    client leaving (or its deadline), unless ``drained()``: then this server cancelled it to shut
    down, and the client is told to go elsewhere (UNAVAILABLE)."""
    code = "OK"
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        if not drained():
            code = "CANCELLED"
            raise
        await abort(context, ServerDrainingError())
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # noqa: BLE001 - every error must reach the client as a status
        call.failed(error)
        await abort(context, error)
    finally:
        call.finish(code_name(context, code))


def _rpc(method: Method) -> Handler:
    """Any exception of ``method`` becomes its mapped status (mlipserve.status); the call is observed
    as the RPC of the method's name (compute: Compute)."""
    rpc = "".join(part.title() for part in method.__name__.split("_"))

    @functools.wraps(method)
    async def wrapper(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        call = self.calls.start(rpc)
        call.received(len(raw))
        async with reported(context, call):
            response = await method(self, raw, context, call)
            call.answered(len(response))
            return response

    return wrapper


class MLIPServicer:
    def __init__(self, engine: Engine, limits: Limits, info_wait_s: float = 2.0,
                 observer: RequestObserver = NO_OBSERVER) -> None:
        self.engine = engine
        self.limits = limits
        # How long ListModels and GetModel wait for a model on another replica (then: LOADING).
        self.info_wait_s = info_wait_s
        self.calls = Calls(observer, engine.model_ids)

    def methods(self) -> dict[str, grpc.RpcMethodHandler]:
        # No (de)serializers: the handlers see and answer raw bytes.
        methods = {"Compute": self.compute, "ListModels": self.list_models, "GetModel": self.get_model}
        return {name: grpc.unary_unary_rpc_method_handler(m) for name, m in methods.items()}

    async def available_info(self, model_id: str) -> ModelInfo:
        """The model's metadata if the caller may use it and it is ready (else the error why)."""
        check_model_id(model_id)
        principal = current_principal.get()
        if principal is not None:
            # Before the model's existence: a scoped token learns nothing about other models.
            principal.require_model(model_id)
        info = await self.engine.info(model_id)
        if info.status is not ModelStatus.AVAILABLE:
            raise ModelUnavailableError(model_id, info.status_message or info.status.value)
        return info

    @_rpc
    async def compute(self, raw: bytes, context: grpc.aio.ServicerContext, call: Call) -> bytes:
        check_message_size(len(raw), self.limits)
        message = decode(compute_pb2.ComputeRequest, raw)
        call.name_model(message.model)
        check_compute_limits(message, self.limits)
        big = sum(len(s.atomic_numbers) for s in message.systems) > OFFLOAD_ATOMS
        info = await self.available_info(message.model)
        compute = await _off_loop_if(big, convert.compute_request_from_proto, message)
        compute = await _off_loop_if(big, prepare, info, compute, self.limits)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        async with asyncio.timeout(remaining):
            with call.in_engine():
                results = await self.engine.compute(compute, deadline)
        response = compute_pb2.ComputeResponse(
            model=compute.model,
            model_version=info.version,
            results=[convert.result_to_proto(r) for r in results],
            corrections=[c.name for c in compute.corrections],
        )
        return await _off_loop_if(big, response.SerializeToString)

    @_rpc
    async def list_models(self, raw: bytes, context: grpc.aio.ServicerContext, call: Call) -> bytes:
        call.model = NO_MODEL
        decode(models_pb2.ListModelsRequest, raw)
        infos = await asyncio.gather(*(self.engine.info(m, wait_s=self.info_wait_s) for m in self.engine.model_ids))
        principal = current_principal.get()
        if principal is not None and principal.models is not None:
            infos = [i for i in infos if i.id in principal.models]
        return models_pb2.ListModelsResponse(models=[convert.model_info_to_proto(i) for i in infos]).SerializeToString()

    @_rpc
    async def get_model(self, raw: bytes, context: grpc.aio.ServicerContext, call: Call) -> bytes:
        request = decode(models_pb2.GetModelRequest, raw)
        call.name_model(request.model)
        check_model_id(request.model)
        principal = current_principal.get()
        if principal is not None:
            principal.require_model(request.model)
        info = await self.engine.info(request.model, wait_s=self.info_wait_s)
        return models_pb2.GetModelResponse(model=convert.model_info_to_proto(info)).SerializeToString()

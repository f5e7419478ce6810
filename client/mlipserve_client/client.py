"""MLIPClient: one gRPC channel to an mlipserve server, with deadlines and retries on every call."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import grpc
from ase import Atoms

from mlipserve_client import convert
from mlipserve_client.errors import ServiceError, ServiceInputError
from mlipserve_client.types import DEFAULT_PROPERTIES, ComputeRequest, Correction, ModelInfo, Property, Result, System
from mlipserve_client.v1 import models_pb2, service_pb2_grpc

DEFAULT_TIMEOUT_S = 60.0
SERVICE_NAME = "mlipserve.v1.MLIPService"
_INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

# Every RPC of the API is a pure function of its request, so retrying one the server could not take
# (UNAVAILABLE: restarting, no replica yet; RESOURCE_EXHAUSTED: queue full) is always safe.
_RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": SERVICE_NAME}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2.5,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }]
})


def _raise_service_error(err: grpc.RpcError) -> None:
    code, details = err.code(), err.details() or ""
    error_class = ServiceInputError if code in _INPUT_CODES else ServiceError
    raise error_class(code, details) from None


class MLIPClient:
    """A connection to an mlipserve server at ``address`` ("host:port").

    ``model`` is the default model id for ``compute``; ``timeout`` (s) is the deadline of each call.
    Thread-safe: share one client between threads.
    """

    def __init__(
        self,
        address: str,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: bool = True,
    ) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout
        options = [
            # The server accepts large systems; so must we when they come back with forces.
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.enable_retries", int(retries)),
        ]
        if retries:
            options.append(("grpc.service_config", _RETRY_SERVICE_CONFIG))
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = service_pb2_grpc.MLIPServiceStub(self._channel)

    def compute(
        self,
        systems: Atoms | System | Sequence[Atoms | System],
        properties: Iterable[Property | str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        task: str = "",
        corrections: Sequence[Correction] = (),
        timeout: float | None = None,
    ) -> list[Result]:
        """Evaluate one model on one or more systems in one call; results come back in order.

        ``task`` picks a head or fidelity of multi-task models (ModelInfo.tasks); ``corrections``
        (Electrostatics, Dispersion) are added to the model's energy, forces and stress, and each
        one's energy is reported in ``Result.corrections``."""
        if isinstance(systems, (Atoms, System)):
            systems = [systems]
        model = model or self.model
        if not model:
            raise ValueError("no model given: pass model= here or to MLIPClient")
        typed = tuple(s if isinstance(s, System) else convert.system_from_atoms(s) for s in systems)
        request = ComputeRequest(model=model, systems=typed, properties=frozenset(Property(p) for p in properties),
                                 task=task, corrections=tuple(corrections))
        try:
            response = self._stub.Compute(
                convert.compute_request_to_proto(request), timeout=timeout or self.timeout
            )
        except grpc.RpcError as err:
            _raise_service_error(err)
        return [convert.result_from_proto(r, s.n_atoms) for r, s in zip(response.results, typed, strict=True)]

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(models_pb2.ListModelsRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            _raise_service_error(err)
        return [convert.model_info_from_proto(m) for m in response.models]

    def get_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        try:
            response = self._stub.GetModel(models_pb2.GetModelRequest(model=model), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            _raise_service_error(err)
        return convert.model_info_from_proto(response.model)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MLIPClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

"""MLIPIngress: the gRPC face of the application on Ray Serve's gRPC proxy.

Parses and validates requests (mlipserve_client.convert), routes each to its model's deployment,
and maps every error to a status (mlipserve.status). Also answers grpc.health.v1.Health, which the
Serve proxy routes here like any other method. Imports no torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from mlipserve.backends.base import check_request
from mlipserve.config import ServiceConfig
from mlipserve.corrections import resolve_corrections
from mlipserve.errors import ModelNotFoundError, ModelUnavailableError, UnknownHealthServiceError
from mlipserve.status import grpc_method, status_for
from mlipserve_client import convert
from mlipserve_client.client import SERVICE_NAME
from mlipserve_client.types import Electrostatics, ModelInfo, ModelStatus, Property
from mlipserve_client.v1 import compute_pb2, models_pb2

logger = logging.getLogger("mlipserve.ingress")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_WATCH_INTERVAL_S = 1.0


@serve.deployment
class MLIPIngress:
    def __init__(self, config: ServiceConfig, families: dict[str, DeploymentHandle]) -> None:
        self.config = config
        self.families = families
        self.family_of = {m.id: m.family_name for m in config.models}
        # Handles that route to a replica where the model is resident (Serve's model multiplexing).
        self._routes = {m: families[f].options(multiplexed_model_id=m) for m, f in self.family_of.items()}
        # Metadata of models that answered AVAILABLE: fixed for the life of their deployment.
        self._available: dict[str, ModelInfo] = {}

    # --- routing ---------------------------------------------------------------------------------

    def _handle(self, model_id: str) -> DeploymentHandle:
        handle = self._routes.get(model_id)
        if handle is None:
            raise ModelNotFoundError(model_id, list(self.family_of))
        return handle

    async def _family_infos(self, family: str, timeout_s: float | None) -> dict[str, ModelInfo]:
        """Metadata and status of a family's models, waiting at most ``timeout_s`` for a starting
        replica (then LOADING). Never raises: the status says what is wrong."""
        models = [m.id for m in self.config.families[family]]
        if all(m in self._available for m in models):
            return {m: self._available[m] for m in models}
        try:
            infos = await asyncio.wait_for(self.families[family].info.remote(), timeout_s)
        except TimeoutError:
            infos = {m: ModelInfo(id=m, architecture=family, status=ModelStatus.LOADING,
                                  status_message="the model's replica is starting") for m in models}
        except Exception as error:  # noqa: BLE001 - reported as the models' status
            _, message = status_for(error)
            infos = {m: ModelInfo(id=m, architecture=family, status=ModelStatus.UNAVAILABLE, status_message=message)
                     for m in models}
        for model_id, info in infos.items():
            if info.status is ModelStatus.AVAILABLE:
                self._available[model_id] = info
        return infos

    async def _info(self, model_id: str, timeout_s: float | None = None) -> ModelInfo:
        if model_id in self._available:
            return self._available[model_id]
        return (await self._family_infos(self.family_of[model_id], timeout_s))[model_id]

    async def _all_infos(self) -> list[ModelInfo]:
        per_family = await asyncio.gather(
            *(self._family_infos(f, self.config.health_timeout_s) for f in self.families))
        merged = {k: v for infos in per_family for k, v in infos.items()}
        return [merged[m.id] for m in self.config.models]

    # --- mlipserve.v1.MLIPService ----------------------------------------------------------------

    @grpc_method(compute_pb2.ComputeResponse)
    async def Compute(self, request: compute_pb2.ComputeRequest, grpc_context) -> compute_pb2.ComputeResponse:
        compute = convert.compute_request_from_proto(request)
        handle = self._handle(compute.model)
        # No timeout: a starting replica answers when loaded, within the caller's deadline.
        info = await self._info(compute.model)
        if info.status is not ModelStatus.AVAILABLE:
            raise ModelUnavailableError(compute.model, info.status_message)
        # The one place requests are checked against the model: a bad request never reaches it.
        # Electrostatics (asked for or baked in) provides charges whether or not the model has them.
        with_charges = any(isinstance(c, Electrostatics) for c in (*info.corrections, *compute.corrections))
        from_model = compute.properties - {Property.CHARGES} if with_charges else compute.properties
        check_request(info, compute.systems, from_model, compute.task)
        corrections = resolve_corrections(info, compute.corrections, compute.systems)
        if with_charges:
            # The charges electrostatics used come back with every result.
            compute = dataclasses.replace(compute, properties=compute.properties | {Property.CHARGES})
        compute = dataclasses.replace(compute, corrections=corrections)
        results = await handle.compute.remote(compute)
        return compute_pb2.ComputeResponse(
            model=compute.model,
            model_version=info.version,
            results=[convert.result_to_proto(r) for r in results],
            corrections=[c.name for c in compute.corrections],
        )

    @grpc_method(models_pb2.ListModelsResponse)
    async def ListModels(self, request: models_pb2.ListModelsRequest, grpc_context) -> models_pb2.ListModelsResponse:
        infos = await self._all_infos()
        return models_pb2.ListModelsResponse(models=[convert.model_info_to_proto(i) for i in infos])

    @grpc_method(models_pb2.GetModelResponse)
    async def GetModel(self, request: models_pb2.GetModelRequest, grpc_context) -> models_pb2.GetModelResponse:
        self._handle(request.model)
        info = await self._info(request.model, self.config.health_timeout_s)
        return models_pb2.GetModelResponse(model=convert.model_info_to_proto(info))

    # --- grpc.health.v1.Health -------------------------------------------------------------------

    async def _health(self, service: str) -> int:
        """"" and the API's name: SERVING once no model is loading and one is available.
        "<API name>/<model id>": that model alone."""
        if service in ("", SERVICE_NAME):
            statuses = {i.status for i in await self._all_infos()}
            ready = ModelStatus.LOADING not in statuses and ModelStatus.AVAILABLE in statuses
            return SERVING if ready else NOT_SERVING
        prefix = SERVICE_NAME + "/"
        if service.startswith(prefix) and service[len(prefix):] in self.family_of:
            info = await self._info(service[len(prefix):], self.config.health_timeout_s)
            return SERVING if info.status is ModelStatus.AVAILABLE else NOT_SERVING
        return SERVICE_UNKNOWN

    @grpc_method(health_pb2.HealthCheckResponse)
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        status = await self._health(request.service)
        if status == SERVICE_UNKNOWN:
            raise UnknownHealthServiceError(request.service, [SERVICE_NAME] + [f"{SERVICE_NAME}/{m}" for m in self.family_of])
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        last = None
        while True:
            status = await self._health(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(_WATCH_INTERVAL_S)

"""FamilyRouter: the Engine of a family replica's front door.

Requests for the replica's own family go straight to its ModelHost, in-process: no Ray hop. Those
for another family go to that family's deployment by DeploymentHandle (Serve picks a replica that
holds the model); if the replica dies under a request, the request is retried on another (or on
the restarted one) until its deadline, bounded by ``retry_s``, and only then is it UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from mlipserve.errors import ModelNotFoundError, ReplicaLostError
from mlipserve.hosting import ModelHost
from mlipserve.status import status_for
from mlipserve_client.types import ComputeRequest, ModelInfo, ModelStatus, Result

logger = logging.getLogger("mlipserve.routing")

# What a lost or restarting replica raises to its callers; anything else is the request's own error.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
_FIRST_RETRY_S = 0.1
_MAX_RETRY_DELAY_S = 2.0


class FamilyRouter:
    def __init__(self, local: ModelHost, family_of: Mapping[str, str], peers: Mapping[str, DeploymentHandle],
                 retry_s: float) -> None:
        self.local = local
        self._family_of = dict(family_of)
        self._peers = dict(peers)
        self._retry_s = retry_s
        # Handles that route to a replica where the model is resident (Serve's model multiplexing).
        self._routes = {m: peers[f].options(multiplexed_model_id=m) for m, f in family_of.items()
                        if f != local.family}
        # Metadata of other families' models that answered AVAILABLE: fixed for their deployment's life.
        self._available: dict[str, ModelInfo] = {}

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._family_of)

    async def info(self, model_id: str, wait_s: float | None = None) -> ModelInfo:
        family = self._family_of.get(model_id)
        if family is None:
            raise ModelNotFoundError(model_id, list(self._family_of))
        if family == self.local.family:
            return await self.local.info(model_id)
        if model_id not in self._available:
            return (await self._peer_infos(family, wait_s))[model_id]
        return self._available[model_id]

    async def _peer_infos(self, family: str, wait_s: float | None) -> dict[str, ModelInfo]:
        """A family's metadata and status, waiting at most ``wait_s`` for a starting replica (then
        LOADING). Never raises: the status says what is wrong."""
        models = [m for m, f in self._family_of.items() if f == family]
        try:
            infos = await asyncio.wait_for(self._peers[family].info.remote(), wait_s)
        except TimeoutError:
            infos = {m: ModelInfo(id=m, architecture=family, status=ModelStatus.LOADING,
                                  status_message="the model's replica is starting") for m in models}
        except Exception as error:  # noqa: BLE001 - reported as the models' status
            message = status_for(error).message
            infos = {m: ModelInfo(id=m, architecture=family, status=ModelStatus.UNAVAILABLE, status_message=message)
                     for m in models}
        for model_id, info in infos.items():
            if info.status is ModelStatus.AVAILABLE:
                self._available[model_id] = info
        return infos

    async def compute(self, request: ComputeRequest, deadline: float | None) -> list[Result]:
        if self._family_of.get(request.model) == self.local.family:
            return await self.local.compute(request, deadline)
        give_up = time.monotonic() + self._retry_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        delay = _FIRST_RETRY_S
        while True:
            try:
                return await self._routes[request.model].compute.remote(request)
            except REPLICA_LOST as error:
                if time.monotonic() + delay >= give_up:
                    raise ReplicaLostError(f"no replica of model {request.model!r} answered within "
                                           f"{self._retry_s:g} s after its replica was lost; retry") from error
                logger.warning("model %s: replica lost (%s); retrying in %.1f s", request.model,
                               type(error).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _MAX_RETRY_DELAY_S)

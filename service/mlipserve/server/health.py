"""grpc.health.v1 from grpcio-health-checking, fed by the models' readiness.

"" and the API's name are SERVING once no model is loading and at least one is available (a model
whose checkpoint failed to load is UNAVAILABLE, not a reason to take the others out of service);
``mlipserve.v1.MLIPService/<model id>`` reports one model.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from mlipserve.server.engine import Engine
from mlipserve_client.client import SERVICE_NAME
from mlipserve_client.types import ModelStatus

logger = logging.getLogger("mlipserve.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_service_name(model_id: str) -> str:
    return f"{SERVICE_NAME}/{model_id}"


class HealthReporter:
    """Keeps a HealthServicer's statuses in step with the engine's models."""

    def __init__(self, engine: Engine, wait_s: float, interval_s: float = 1.0) -> None:
        self.engine = engine
        self.wait_s = wait_s
        self.interval_s = interval_s
        self.servicer = HealthServicer()
        self._task: asyncio.Task | None = None

    async def refresh(self) -> bool:
        """Read every model's status and publish it; True when the whole service is SERVING."""
        infos = await asyncio.gather(*(self.engine.info(m, wait_s=self.wait_s) for m in self.engine.model_ids))
        for info in infos:
            await self.servicer.set(model_service_name(info.id),
                                    SERVING if info.status is ModelStatus.AVAILABLE else NOT_SERVING)
        statuses = {i.status for i in infos}
        ready = ModelStatus.LOADING not in statuses and ModelStatus.AVAILABLE in statuses
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)
        return ready

    async def start(self) -> None:
        for service in ("", SERVICE_NAME, *map(model_service_name, self.engine.model_ids)):
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="health")

    async def _follow(self) -> None:
        # Other replicas' models come and go (restarts): keep following them, slowly once all serve.
        while True:
            try:
                ready = await self.refresh()
            except Exception:  # noqa: BLE001 - a failed refresh must not end health reporting
                logger.exception("health refresh failed")
                ready = False
            await asyncio.sleep(self.interval_s * (5 if ready else 1))

    async def drain(self) -> None:
        """Everything NOT_SERVING from now on (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()

"""ModelServer: a Ray Serve deployment hosting one model behind a batch queue."""

from __future__ import annotations

import dataclasses
import logging
import time

from ray import serve

from mlipserve.backends.base import Backend, Batch, warmup_system
from mlipserve.batching import BatchPolicy, BatchQueue, BatchRecord
from mlipserve.config import ModelConfig
from mlipserve.errors import ModelUnavailableError
from mlipserve_client.types import ComputeRequest, ModelInfo, ModelStatus, Result

logger = logging.getLogger("mlipserve.model")


@serve.deployment
class ModelServer:
    """Loads its model once, warms it up, then answers compute requests through a BatchQueue.

    A model that fails to load does not take the application down: the replica stays up, reports
    UNAVAILABLE with the reason, and refuses compute requests, while other models keep serving.
    """

    def __init__(self, config: ModelConfig) -> None:
        import torch

        from mlipserve.backends import load_backend

        # The replica owns its process; its CPU reservation is its thread budget.
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.backend: Backend | None = None
        self.queue: BatchQueue | None = None
        self._info = ModelInfo(id=config.id, architecture=config.backend, status=ModelStatus.LOADING)
        start = time.perf_counter()
        try:
            self.backend = load_backend(config)
            info = self.backend.info
            self.backend.compute(Batch((warmup_system(info),), info.properties, info.default_task))
        except Exception as error:  # noqa: BLE001 - reported through ListModels and health instead
            logger.exception("model %s failed to load", config.id)
            self._info = dataclasses.replace(
                self._info, status=ModelStatus.UNAVAILABLE, status_message=f"failed to load: {error}"
            )
            return
        self._info = dataclasses.replace(self.backend.info, id=config.id, status=ModelStatus.AVAILABLE)
        policy = BatchPolicy(
            max_batch_atoms=config.max_batch_atoms,
            max_wait_s=config.max_wait_ms / 1000,
            max_queued_atoms=config.max_queued_atoms,
        )
        self.queue = BatchQueue(config.id, self.backend.compute, policy)
        logger.info("model %s ready in %.1f s", config.id, time.perf_counter() - start)

    async def info(self) -> ModelInfo:
        return self._info

    async def batch_history(self) -> list[BatchRecord]:
        """The most recent batches this replica ran (sizes and times), oldest first."""
        return list(self.queue.history) if self.queue is not None else []

    async def compute(self, request: ComputeRequest) -> list[Result]:
        """Results for a request the ingress has validated against ``info()`` (check_request)."""
        if self.queue is None:
            raise ModelUnavailableError(self.config.id, self._info.status_message)
        return await self.queue.submit(request)

    def __del__(self) -> None:
        if self.queue is not None:
            self.queue.close()

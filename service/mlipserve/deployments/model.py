"""ModelServer: the Ray Serve deployment of one backend family, its checkpoints multiplexed on it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from mlipserve.backends.base import Backend, Batch, cost_function, warmup_system
from mlipserve.batching import BatchPolicy, BatchQueue, BatchRecord
from mlipserve.capacity import GuardedEvaluator, ProbeResult, probe
from mlipserve.config import DeploymentConfig, ModelConfig
from mlipserve.errors import ModelNotFoundError, ModelUnavailableError
from mlipserve.metrics import BatchMetrics
from mlipserve.physics.corrected import CorrectedEvaluator
from mlipserve_client.types import ComputeRequest, ModelInfo, ModelStatus, Result

logger = logging.getLogger("mlipserve.model")


class LoadedModel:
    """A backend with its batch queue: what the multiplexed loader returns and the LRU evicts."""

    def __init__(self, backend: Backend, queue: BatchQueue, on_unload) -> None:
        self.backend = backend
        self.queue = queue
        self._on_unload = on_unload

    def __del__(self) -> None:
        # Ray's multiplexer calls this when it evicts the model; queued requests still finish.
        self.queue.close()
        self._on_unload(self)


@serve.deployment
class ModelServer:
    """Hosts the models of one backend family. Every model is loaded once at start (to learn its
    metadata, warm it up and probe its batch budget); at most ``max_models_per_replica`` stay
    resident, least recently used evicted, and a request for an evicted one loads it again.

    A model that fails to load does not take the others down: it is reported UNAVAILABLE with the
    reason, and its requests are refused.
    """

    async def __init__(self, family: str, models: tuple[ModelConfig, ...], deployment: DeploymentConfig) -> None:
        import torch

        # The replica owns its process; its CPU reservation is its thread budget.
        torch.set_num_threads(deployment.torch_threads)
        self.family = family
        self.deployment = deployment
        self.configs = {m.id: m for m in models}
        self._infos = {m.id: ModelInfo(id=m.id, architecture=family, status=ModelStatus.LOADING) for m in models}
        # Measured once per model on this replica's device and kept across evictions, as is the
        # capacity a model learned from running out of memory.
        self._probes: dict[str, ProbeResult] = {}
        self._capacity: dict[str, float] = {}
        self._resident: dict[str, LoadedModel] = {}
        # Two compute lanes shared by the replica's models: batches of small systems, and large
        # systems one at a time, so that neither starves the other.
        self._small_lane = ThreadPoolExecutor(1, thread_name_prefix=f"{family}-small")
        self._large_lane = ThreadPoolExecutor(1, thread_name_prefix=f"{family}-large")
        self._metrics = BatchMetrics()

        async def load(model_id: str) -> LoadedModel:
            return await self._load(model_id)

        self._cached = serve.multiplexed(max_num_models_per_replica=deployment.max_models_per_replica)(load)
        for model_id in self.configs:
            try:
                await self._cached(model_id)
            except ModelUnavailableError:
                pass  # recorded in its ModelInfo; the other models serve

    def _device(self, config: ModelConfig) -> str:
        return config.device or self.deployment.device

    async def _load(self, model_id: str) -> LoadedModel:
        config = self.configs[model_id]
        start = time.perf_counter()
        try:
            # On the compute lane: loading and probing are torch work, and the event loop stays free.
            loaded = await asyncio.get_running_loop().run_in_executor(self._small_lane, self._build, config)
        except Exception as error:  # noqa: BLE001 - reported through ListModels and health
            logger.exception("model %s failed to load", model_id)
            self._infos[model_id] = dataclasses.replace(
                self._infos[model_id], status=ModelStatus.UNAVAILABLE, status_message=f"failed to load: {error}")
            raise ModelUnavailableError(model_id, self._infos[model_id].status_message) from error
        self._infos[model_id] = dataclasses.replace(loaded.backend.info, id=model_id, status=ModelStatus.AVAILABLE,
                                                    corrections=config.corrections)
        self._resident[model_id] = loaded
        logger.info("model %s loaded in %.1f s (budget %.3g)", model_id, time.perf_counter() - start,
                    loaded.queue.budget)
        return loaded

    def _build(self, config: ModelConfig) -> LoadedModel:
        """Load, warm up and (once per model and device) probe; runs on the compute lane."""
        from mlipserve.backends import load_backend

        device = self._device(config)
        backend = load_backend(config, device)
        info = backend.info
        backend.compute(Batch((warmup_system(info),), info.properties, info.default_task))
        cost = cost_function(backend)
        batching = config.batching
        if config.id not in self._probes:
            self._probes[config.id] = (
                ProbeResult(budget=batching.budget, bytes_per_work=0.0, points=())
                if batching.budget is not None and batching.memory_limit_mb is None
                else probe(backend, cost, device, batching.max_batch_latency_ms / 1000))
        measured = self._probes[config.id]
        budget = batching.budget if batching.budget is not None else measured.budget
        policy = BatchPolicy(budget=budget, max_wait_s=batching.max_wait_ms / 1000,
                             max_queued_work=batching.max_queued_work, large_system_atoms=batching.large_system_atoms)
        limit = batching.memory_limit_mb * 1e6 if batching.memory_limit_mb is not None else None
        evaluate = CorrectedEvaluator(GuardedEvaluator(backend, cost, device, measured.bytes_per_work, limit),
                                      info, device)
        observer = self._metrics.observer(config.id, device)
        observer.budget_chosen(budget)
        queue = BatchQueue(config.id, evaluate, cost, policy, self._small_lane, self._large_lane, observer,
                           capacity=self._capacity.get(config.id, math.inf))
        return LoadedModel(backend, queue, self._unloaded)

    def _unloaded(self, loaded: LoadedModel) -> None:
        for model_id, resident in list(self._resident.items()):
            if resident is loaded:
                self._capacity[model_id] = loaded.queue.capacity
                del self._resident[model_id]

    # --- called by the ingress -------------------------------------------------------------------

    async def info(self) -> dict[str, ModelInfo]:
        return dict(self._infos)

    async def compute(self, request: ComputeRequest) -> list[Result]:
        """Results for a request the ingress has validated against ``info()`` (check_request)."""
        info = self._infos.get(request.model)
        if info is None:
            raise ModelNotFoundError(request.model, list(self.configs))
        if info.status is ModelStatus.UNAVAILABLE:
            raise ModelUnavailableError(request.model, info.status_message)
        loaded = await self._cached(request.model)
        return await loaded.queue.submit(request)

    # --- introspection (tests, benchmarks) -------------------------------------------------------

    async def resident_models(self) -> list[str]:
        return sorted(self._resident)

    async def batch_history(self, model_id: str) -> list[BatchRecord]:
        loaded = self._resident.get(model_id)
        return list(loaded.queue.history) if loaded else []

    async def probe_result(self, model_id: str) -> ProbeResult | None:
        return self._probes.get(model_id)

    def __del__(self) -> None:
        self._small_lane.shutdown(wait=False, cancel_futures=True)
        self._large_lane.shutdown(wait=False, cancel_futures=True)

"""ModelHost: the models of one backend family in this process, each with its batch queue.

It loads every model once at start (to learn its metadata, warm it up and probe its batch budget),
keeps at most ``max_models_per_replica`` resident (least recently used evicted, reloaded on the
next request) and answers typed requests. No Ray and no gRPC: in a Serve replica the residency
cache is Serve's model multiplexer (so that Serve routes a model's requests to a replica that holds
it); in-process it is a plain LRU. A model that fails to load does not take the others down: it is
reported UNAVAILABLE with the reason, and its requests are refused.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from mlipserve.backends.base import Backend, Batch, cost_function, warmup_system
from mlipserve.batching import BatchObserver, BatchPolicy, BatchQueue, BatchRecord
from mlipserve.capacity import GuardedEvaluator, ProbeResult, probe
from mlipserve.config import DeploymentConfig, ModelConfig
from mlipserve.errors import ModelNotFoundError, ModelUnavailableError
from mlipserve.physics.corrected import CorrectedEvaluator, EvaluationObserver
from mlipserve_client.types import ComputeRequest, ModelInfo, ModelStatus, Result

logger = logging.getLogger("mlipserve.model")


class ModelObserver(BatchObserver, EvaluationObserver, Protocol):
    """Hears what one model's queue does and how long its evaluations take (metrics)."""


class LoadedModel:
    """A backend with its batch queue: what the residency cache holds and evicts."""

    def __init__(self, backend: Backend, queue: BatchQueue, on_unload: Callable[[LoadedModel], None]) -> None:
        self.backend = backend
        self.queue = queue
        self._on_unload = on_unload
        self._closed = False

    def close(self) -> None:
        """Evicted: queued requests still finish, then the queue's lanes stop."""
        if not self._closed:
            self._closed = True
            self.queue.close()
            self._on_unload(self)

    def __del__(self) -> None:
        # Serve's multiplexer calls this when it evicts the model.
        self.close()


LoadFn = Callable[[str], Awaitable[LoadedModel]]
# (load, capacity) -> get: a cache of at most ``capacity`` resident models.
ResidencyCache = Callable[[LoadFn, int], LoadFn]


class LRUModels:
    """The in-process residency cache: at most ``capacity`` models, least recently used evicted."""

    def __init__(self, load: LoadFn, capacity: int) -> None:
        self._load = load
        self._capacity = capacity
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    async def __call__(self, model_id: str) -> LoadedModel:
        async with self._lock:
            if model_id not in self._models:
                self._models[model_id] = await self._load(model_id)
                while len(self._models) > self._capacity:
                    self._models.popitem(last=False)[1].close()
            self._models.move_to_end(model_id)
            return self._models[model_id]


class ModelHost:
    def __init__(self, family: str, models: tuple[ModelConfig, ...], deployment: DeploymentConfig,
                 residency: ResidencyCache = LRUModels,
                 observer: Callable[[str, str], ModelObserver] | None = None) -> None:
        """``observer(model_id, device)`` gives each model's BatchQueue its observer (metrics)."""
        self.family = family
        self.deployment = deployment
        self.configs = {m.id: m for m in models}
        self._infos = {m.id: ModelInfo(id=m.id, architecture=family, status=ModelStatus.LOADING,
                                       status_message="the model is loading") for m in models}
        # Measured once per model on this replica's device and kept across evictions, as is the
        # capacity a model learned from running out of memory.
        self._probes: dict[str, ProbeResult] = {}
        self._capacity: dict[str, float] = {}
        self._resident: dict[str, LoadedModel] = {}
        # Two compute lanes shared by the models: batches of small systems, and large systems one at
        # a time, so that neither starves the other.
        self._small_lane = ThreadPoolExecutor(1, thread_name_prefix=f"{family}-small")
        self._large_lane = ThreadPoolExecutor(1, thread_name_prefix=f"{family}-large")
        self._observer = observer
        self._cached = residency(self._load, deployment.max_models_per_replica)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self.configs)

    async def load_all(self) -> None:
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
        backend_info = loaded.backend.info
        self._infos[model_id] = dataclasses.replace(backend_info, id=model_id, status=ModelStatus.AVAILABLE,
                                                    version=config.version or backend_info.version,
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
        observer = self._observer(config.id, device) if self._observer else None
        evaluate = CorrectedEvaluator(GuardedEvaluator(backend, cost, device, measured.bytes_per_work, limit),
                                      info, device, observer)
        if observer is not None:
            observer.budget_chosen(budget)
        queue = BatchQueue(config.id, evaluate, cost, policy, self._small_lane, self._large_lane, observer,
                           capacity=self._capacity.get(config.id, math.inf))
        return LoadedModel(backend, queue, self._unloaded)

    def _unloaded(self, loaded: LoadedModel) -> None:
        for model_id, resident in list(self._resident.items()):
            if resident is loaded:
                self._capacity[model_id] = loaded.queue.capacity
                del self._resident[model_id]

    # --- the engine's side ---------------------------------------------------------------------

    async def info(self, model_id: str, wait_s: float | None = None) -> ModelInfo:
        info = self._infos.get(model_id)
        if info is None:
            raise ModelNotFoundError(model_id, list(self.configs))
        return info

    async def infos(self) -> dict[str, ModelInfo]:
        return dict(self._infos)

    async def compute(self, request: ComputeRequest, deadline: float | None = None) -> list[Result]:
        """Results for a request validated against ``info()`` (mlipserve.server.servicer.prepare)."""
        info = await self.info(request.model)
        if info.status is not ModelStatus.AVAILABLE:
            raise ModelUnavailableError(request.model, info.status_message)
        loaded = await self._cached(request.model)
        return await loaded.queue.submit(request)

    # --- introspection (tests, benchmarks) -----------------------------------------------------

    def resident_models(self) -> list[str]:
        return sorted(self._resident)

    def batch_history(self, model_id: str) -> list[BatchRecord]:
        loaded = self._resident.get(model_id)
        return list(loaded.queue.history) if loaded else []

    def probe_result(self, model_id: str) -> ProbeResult | None:
        return self._probes.get(model_id)

    def requests_held(self) -> int:
        """Requests queued or running in this host's models (autoscaling's signal)."""
        return sum(loaded.queue.requests_held for loaded in self._resident.values())

    def neighbour_stats(self, model_id: str):
        """The skin neighbour lists' counters of a resident model whose backend keeps them, else None."""
        loaded = self._resident.get(model_id)
        stats = getattr(loaded.backend, "neighbour_stats", None) if loaded else None
        return stats() if stats else None

    async def aclose(self) -> None:
        """Stop the models' queues (on the event loop they run on) and the compute lanes."""
        for loaded in list(self._resident.values()):
            loaded.close()
        self._small_lane.shutdown(wait=False, cancel_futures=True)
        self._large_lane.shutdown(wait=False, cancel_futures=True)

"""Prometheus metrics of the batcher, published through Ray Serve's metrics (scraped from each
node's Ray metrics endpoint, prefixed ``ray_`` there)."""

from __future__ import annotations

from ray.serve import metrics

from mlipserve.batching import BatchRecord

_ATOM_BUCKETS = [8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536]


class BatchMetrics:
    """One set of metrics per replica; ``observer(model, device)`` gives a BatchQueue its observer."""

    def __init__(self) -> None:
        tags = ("model", "device")
        self.batches = metrics.Counter("mlipserve_batches", "Forward passes run.", tag_keys=(*tags, "lane"))
        self.batch_atoms = metrics.Histogram("mlipserve_batch_atoms", "Atoms per forward pass.",
                                             boundaries=_ATOM_BUCKETS, tag_keys=tags)
        self.batch_requests = metrics.Histogram("mlipserve_batch_requests", "Requests merged per forward pass.",
                                                boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=tags)
        self.batch_seconds = metrics.Histogram("mlipserve_batch_seconds", "Forward pass time.",
                                               boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30], tag_keys=tags)
        self.budget = metrics.Gauge("mlipserve_batch_budget", "Work per batch chosen by the probe (0: no merging).",
                                    tag_keys=tags)
        self.capacity = metrics.Gauge("mlipserve_device_capacity", "Work per batch learned to fit the device.",
                                      tag_keys=tags)
        self.queued = metrics.Gauge("mlipserve_queued_work", "Work waiting in the model's queue.", tag_keys=tags)

    def observer(self, model: str, device: str) -> _QueueObserver:
        return _QueueObserver(self, {"model": model, "device": device})


class _QueueObserver:
    def __init__(self, metrics_: BatchMetrics, tags: dict[str, str]) -> None:
        self._m = metrics_
        self._tags = tags

    def budget_chosen(self, budget: float) -> None:
        self._m.budget.set(budget, tags=self._tags)

    def batch_done(self, record: BatchRecord) -> None:
        self._m.batches.inc(tags={**self._tags, "lane": record.lane})
        self._m.batch_atoms.observe(record.n_atoms, tags=self._tags)
        self._m.batch_requests.observe(record.n_requests, tags=self._tags)
        self._m.batch_seconds.observe(record.seconds, tags=self._tags)

    def capacity_learned(self, capacity: float, budget: float) -> None:
        self._m.capacity.set(capacity, tags=self._tags)
        self._m.budget.set(budget, tags=self._tags)

    def queue_changed(self, queued_work: float) -> None:
        self._m.queued.set(queued_work, tags=self._tags)

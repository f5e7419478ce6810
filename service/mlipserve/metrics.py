"""Prometheus metrics of the batcher and of the front door, published through Ray Serve's metrics
(scraped from each node's Ray metrics endpoint, prefixed ``ray_`` there; counters end in ``_total``).

Ray's export approximates a histogram's ``_sum`` from its bucket midpoints: quantiles from the
buckets are the numbers to read, means only roughly. Ray's metrics agent drops a gauge's series
that was not set again within two report intervals (~20 s by default), so a gauge that holds still
(an open session, a batch budget) is set again every second (_HeldGauges).
"""

from __future__ import annotations

import collections
import threading
import time

from ray.serve import metrics

from mlipserve.batching import BatchRecord
from mlipserve.server.observer import Exchange

_ATOM_BUCKETS = [8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536]
# From 0.1 ms (a small request's decode) to 30 s (a large batch on CPU): every part of a request's
# time on the same buckets, so that they compare.
_SECONDS = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30]
# Shorter than Ray's shortest report interval (1 s), so that no held gauge misses two reports.
_HOLD_S = 1.0


class _HeldGauges:
    """Sets gauges, and sets every series' last value again each ``_HOLD_S`` from a daemon thread
    (started on the first set). Gauges are set from the event loop and from compute threads."""

    def __init__(self) -> None:
        self._last: dict[tuple[metrics.Gauge, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge: metrics.Gauge, value: float, tags: dict[str, str]) -> None:
        with self._lock:
            gauge.set(value, tags=tags)
            self._last[gauge, tuple(sorted(tags.items()))] = value
            if self._thread is None:
                self._thread = threading.Thread(target=self._hold, name="mlipserve-gauges", daemon=True)
                self._thread.start()

    def _hold(self) -> None:
        while True:
            time.sleep(_HOLD_S)
            with self._lock:
                for (gauge, tags), value in self._last.items():
                    gauge.set(value, tags=dict(tags))


class BatchMetrics:
    """One set of metrics per replica; ``observer(model, device)`` gives a model its observer
    (mlipserve.hosting.ModelObserver: its BatchQueue's and its evaluations')."""

    def __init__(self) -> None:
        tags = ("model", "device")
        self.batches = metrics.Counter("mlipserve_batches", "Forward passes run.", tag_keys=(*tags, "lane"))
        self.batch_atoms = metrics.Histogram("mlipserve_batch_atoms", "Atoms per forward pass.",
                                             boundaries=_ATOM_BUCKETS, tag_keys=tags)
        self.batch_requests = metrics.Histogram("mlipserve_batch_requests", "Requests merged per forward pass.",
                                                boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=tags)
        self.batch_seconds = metrics.Histogram("mlipserve_batch_seconds", "Forward pass time.",
                                               boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30], tag_keys=tags)
        self.queue_wait_seconds = metrics.Histogram(
            "mlipserve_queue_wait_seconds", "Time the first request of a forward pass waited in the model's queue.",
            boundaries=_SECONDS, tag_keys=tags)
        self.model_seconds = metrics.Histogram(
            "mlipserve_model_seconds", "Time of the model itself per evaluation of a batch, corrections excluded.",
            boundaries=_SECONDS, tag_keys=tags)
        self.corrections_seconds = metrics.Histogram(
            "mlipserve_corrections_seconds", "Time of the physics corrections per evaluation of a batch that asks for any.",
            boundaries=_SECONDS, tag_keys=tags)
        self.budget = metrics.Gauge("mlipserve_batch_budget", "Work per batch chosen by the probe (0: no merging).",
                                    tag_keys=tags)
        self.capacity = metrics.Gauge("mlipserve_device_capacity", "Work per batch learned to fit the device.",
                                      tag_keys=tags)
        self.queued = metrics.Gauge("mlipserve_queued_work", "Work waiting in the model's queue.", tag_keys=tags)
        self._gauges = _HeldGauges()

    def observer(self, model: str, device: str) -> _ModelObserver:
        return _ModelObserver(self, {"model": model, "device": device})


class _ModelObserver:
    def __init__(self, metrics_: BatchMetrics, tags: dict[str, str]) -> None:
        self._m = metrics_
        self._tags = tags

    def budget_chosen(self, budget: float) -> None:
        self._m._gauges.set(self._m.budget, budget, self._tags)

    def batch_done(self, record: BatchRecord) -> None:
        self._m.batches.inc(tags={**self._tags, "lane": record.lane})
        self._m.batch_atoms.observe(record.n_atoms, tags=self._tags)
        self._m.batch_requests.observe(record.n_requests, tags=self._tags)
        self._m.batch_seconds.observe(record.seconds, tags=self._tags)
        self._m.queue_wait_seconds.observe(record.queued_s, tags=self._tags)

    def evaluated(self, model_s: float, corrections_s: float | None) -> None:
        self._m.model_seconds.observe(model_s, tags=self._tags)
        if corrections_s is not None:
            self._m.corrections_seconds.observe(corrections_s, tags=self._tags)

    def capacity_learned(self, capacity: float, budget: float) -> None:
        self._m._gauges.set(self._m.capacity, capacity, self._tags)
        self._m._gauges.set(self._m.budget, budget, self._tags)

    def queue_changed(self, queued_work: float) -> None:
        self._m._gauges.set(self._m.queued, queued_work, self._tags)


class RequestMetrics:
    """The front door's metrics, one set per replica: a RequestObserver (mlipserve.server.observer)
    for its FrontDoor. Its labels arrive bounded: configured model ids (or "unknown"), RPC names,
    status names and auth failure reasons."""

    def __init__(self) -> None:
        call, exchange = ("rpc", "model", "code"), ("rpc", "model")
        self.requests = metrics.Counter("mlipserve_requests", "Calls ended, by RPC, model and status code.",
                                        tag_keys=call)
        self.request_seconds = metrics.Histogram(
            "mlipserve_request_seconds",
            "Time from a request message's arrival to its answer: a unary call, a session's opening or step.",
            boundaries=_SECONDS, tag_keys=exchange)
        self.serialization_seconds = metrics.Histogram(
            "mlipserve_serialization_seconds",
            "The front door's own time per request message: decode, validation and encode.",
            boundaries=_SECONDS, tag_keys=exchange)
        self.request_bytes = metrics.Counter("mlipserve_request_bytes", "Bytes of request messages received.",
                                             tag_keys=exchange)
        self.response_bytes = metrics.Counter("mlipserve_response_bytes", "Bytes of response messages sent.",
                                              tag_keys=exchange)
        self.in_flight = metrics.Gauge("mlipserve_requests_in_flight",
                                       "Calls being handled (a Simulate stream while it is open).", tag_keys=("rpc",))
        self.sessions_open = metrics.Gauge("mlipserve_sessions_open", "MD sessions open.", tag_keys=("model",))
        self.session_steps = metrics.Counter("mlipserve_session_steps", "MD session steps answered.",
                                             tag_keys=("model",))
        self.auth_failures = metrics.Counter(
            "mlipserve_auth_failures",
            "Calls refused for their token: missing_token, invalid_token, rate_limited, model_not_allowed.",
            tag_keys=("reason",))
        self._calls: collections.Counter[str] = collections.Counter()
        self._sessions: collections.Counter[str] = collections.Counter()
        self._gauges = _HeldGauges()

    def call_started(self, rpc: str) -> None:
        self._calls[rpc] += 1
        self._gauges.set(self.in_flight, self._calls[rpc], {"rpc": rpc})

    def call_finished(self, rpc: str, model: str, code: str) -> None:
        self.requests.inc(tags={"rpc": rpc, "model": model, "code": code})
        self._calls[rpc] -= 1
        self._gauges.set(self.in_flight, self._calls[rpc], {"rpc": rpc})

    def exchanged(self, exchange: Exchange) -> None:
        tags = {"rpc": exchange.rpc, "model": exchange.model}
        self.request_seconds.observe(exchange.seconds, tags=tags)
        self.serialization_seconds.observe(exchange.serialization_s, tags=tags)
        if exchange.bytes_in:
            self.request_bytes.inc(exchange.bytes_in, tags=tags)
        if exchange.bytes_out:
            self.response_bytes.inc(exchange.bytes_out, tags=tags)
        if exchange.step:
            self.session_steps.inc(tags={"model": exchange.model})

    def session_opened(self, model: str) -> None:
        self._sessions[model] += 1
        self._gauges.set(self.sessions_open, self._sessions[model], {"model": model})

    def session_closed(self, model: str) -> None:
        self._sessions[model] -= 1
        self._gauges.set(self.sessions_open, self._sessions[model], {"model": model})

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.inc(tags={"reason": reason})

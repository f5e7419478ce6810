"""What a model's device can take: the start-up probe that sizes batches, and the guard that turns
running out of memory (CUDA) or over a CPU ceiling into DeviceOutOfMemory for the batcher.

The probe evaluates 1, 2, 4, ... copies of a small crystal of the model's elements in one forward
pass and measures time and peak memory. The budget is the batch with the best throughput whose
latency stays under the bound; when merging never beats one system at a time by 10 % (typical on a
CPU: CHGNet merged runs at 0.63x), the budget is 0 and requests are not merged.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase.build import bulk

from mlipserve.backends.base import Backend, Batch
from mlipserve.errors import DeviceOutOfMemory
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import DEFAULT_PROPERTIES, ModelInfo, System

logger = logging.getLogger("mlipserve.capacity")

# Crystals to probe with, by preference: (element, structure, lattice constant in Å).
_PROBE_CRYSTALS = (("Si", "diamond", 5.43), ("Cu", "fcc", 3.61), ("Ge", "diamond", 5.66), ("C", "diamond", 3.57),
                   ("Al", "fcc", 4.05), ("Fe", "bcc", 2.87), ("Te", "sc", 3.0))
_PROBE_ATOMS = 16
# Merging must beat one-by-one throughput by this factor to be worth its wait.
_MERGE_GAIN = 1.10


@dataclass(frozen=True)
class ProbePoint:
    n_systems: int
    work: float
    seconds: float
    peak_bytes: int

    @property
    def work_per_s(self) -> float:
        return self.work / self.seconds


@dataclass(frozen=True)
class ProbeResult:
    budget: float  # work per batch; 0 = do not merge
    bytes_per_work: float  # peak memory of a forward pass per unit of work
    points: tuple[ProbePoint, ...]


def probe_system(info: ModelInfo) -> System:
    """A ~16-atom crystal of an element the model knows, slightly rattled."""
    from ase.data import chemical_symbols

    element = next(((e, s, a) for e, s, a in _PROBE_CRYSTALS if chemical_symbols.index(e) in info.elements), None)
    atoms = bulk(*element, cubic=True) if element else bulk(chemical_symbols[info.elements[0]], "sc", a=2.5)
    while len(atoms) < _PROBE_ATOMS:
        atoms = atoms * (2, 1, 1)
    atoms.rattle(0.02, seed=0)
    return system_from_atoms(atoms)


def probe(backend: Backend, cost: Callable[[System], float], device: str, max_batch_latency_s: float,
          time_limit_s: float = 10.0, max_systems: int = 64) -> ProbeResult:
    """Measure throughput and memory against batch size and choose the budget."""
    system = probe_system(backend.info)
    work = cost(system)
    task = backend.info.default_task
    memory = PeakMemory(device)
    backend.compute(Batch((system, system), DEFAULT_PROPERTIES, task))  # warm-up of the merged path
    points, started, k = [], time.perf_counter(), 1
    while k <= max_systems:
        batch = Batch((system,) * k, DEFAULT_PROPERTIES, task)
        times, peak = [], 0
        for _ in range(3 if k <= 4 else 1):
            with memory:
                t0 = time.perf_counter()
                backend.compute(batch)
                times.append(time.perf_counter() - t0)
            peak = max(peak, memory.peak_bytes)
        points.append(ProbePoint(k, k * work, statistics.median(times), peak))
        if points[-1].seconds > max_batch_latency_s or time.perf_counter() - started > time_limit_s:
            break
        k *= 2
    allowed = [p for p in points if p.seconds <= max_batch_latency_s] or points[:1]
    best = max(allowed, key=lambda p: p.work_per_s)
    merging_pays = best.work_per_s >= _MERGE_GAIN * points[0].work_per_s
    bytes_per_work = max(p.peak_bytes / p.work for p in points)
    result = ProbeResult(budget=best.work if merging_pays else 0.0, bytes_per_work=bytes_per_work, points=tuple(points))
    logger.info("probe %s on %s: %s -> budget %.3g", backend.info.id, device,
                ", ".join(f"{p.n_systems}x {p.seconds * 1e3:.0f} ms" for p in points), result.budget)
    return result


class PeakMemory:
    """Peak memory of the block it wraps: CUDA's allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device: str, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        self._peak = self._base
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc_info) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._sampler.join()
        self.peak_bytes = max(self._peak, _rss()) - self._base


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class GuardedEvaluator:
    """backend.compute, with device memory failures raised as DeviceOutOfMemory.

    On CPU there is no allocator failure to catch before the kernel kills the process, so a batch
    whose predicted memory (the probe's bytes per work) exceeds ``memory_limit_bytes`` is refused
    before it runs, exactly as CUDA would refuse it.
    """

    def __init__(self, backend: Backend, cost: Callable[[System], float], device: str,
                 bytes_per_work: float, memory_limit_bytes: float | None) -> None:
        self.backend = backend
        self.cost = cost
        self.device = device
        self.bytes_per_work = bytes_per_work
        self.memory_limit_bytes = memory_limit_bytes

    def __call__(self, batch: Batch) -> list:
        import torch

        work = float(np.sum([self.cost(s) for s in batch.systems]))
        if self.memory_limit_bytes is not None and self.bytes_per_work > 0:
            predicted = self.bytes_per_work * work
            if predicted > self.memory_limit_bytes:
                raise DeviceOutOfMemory(
                    work, f"needs ~{predicted / 1e6:.0f} MB, over the {self.memory_limit_bytes / 1e6:.0f} MB ceiling",
                    capacity=self.memory_limit_bytes / self.bytes_per_work)
        try:
            return self.backend.compute(batch)
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise DeviceOutOfMemory(work, str(error).splitlines()[0]) from error

"""The interface every model backend implements, and the checks every request passes before a model.

A backend turns typed systems into typed results with one model on one device. It knows nothing of
gRPC, Ray or batching policy: it is handed a Batch of systems (already validated with
``check_request``) and evaluates them in one merged forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from ase.data import chemical_symbols

from mlipserve.errors import InvalidSystemError, UnsupportedElementError, UnsupportedPropertyError
from mlipserve.cost import pair_work
from mlipserve.geometry import MAX_NEIGHBOURS_PER_ATOM, check_geometry
from mlipserve_client.types import Correction, ModelInfo, Property, Result, System


@dataclass(frozen=True, eq=False)
class Batch:
    """Systems evaluated together by one model, with the union of what their requests asked for."""

    systems: tuple[System, ...]
    properties: frozenset[Property]
    task: str = ""  # "" = the model's default task
    # Physics corrections to add after the model (mlipserve.physics); backends ignore them.
    corrections: tuple[Correction, ...] = ()
    # Per system, the key (an MD session's id) under which a backend that builds its own edges may
    # keep a skin neighbour list between calls (mlipserve.neighbours); a system without one (None, or
    # every system when empty) gets a fresh list. Results are the same either way.
    neighbour_keys: tuple[Hashable | None, ...] = ()

    def __post_init__(self) -> None:
        if self.neighbour_keys and len(self.neighbour_keys) != len(self.systems):
            raise ValueError(f"{len(self.neighbour_keys)} neighbour keys for {len(self.systems)} systems")

    @property
    def n_atoms(self) -> int:
        return sum(s.n_atoms for s in self.systems)

    def neighbour_key(self, index: int) -> Hashable | None:
        return self.neighbour_keys[index] if self.neighbour_keys else None


@runtime_checkable
class Backend(Protocol):
    """A loaded model. ``info`` describes it (its ``id`` and ``status`` are set by the server).

    A backend may also define ``cost(system) -> float``, the work a system is for it (see
    mlipserve.cost); batch budgets count it. Without one, atoms plus neighbour pairs are counted.
    """

    @property
    def info(self) -> ModelInfo: ...

    def compute(self, batch: Batch) -> list[Result]:
        """One result per system, in order, with exactly the requested properties (stress only for
        systems with a cell). Units: eV, eV/Å, eV/Å³ (ASE sign), μB."""
        ...


def check_request(info: ModelInfo, systems: Sequence[System], properties: frozenset[Property], task: str = "",
                  max_neighbours_per_atom: float = MAX_NEIGHBOURS_PER_ATOM) -> None:
    """Reject what the model cannot take: properties it lacks, a task it does not have, elements it
    was not trained on, and geometries that would give NaN or exhaust memory (mlipserve.geometry)."""
    if task and task not in info.tasks:
        offered = f"its tasks are {', '.join(info.tasks)}" if info.tasks else "it has a single task"
        raise InvalidSystemError("task", f"model {info.id!r} has no task {task!r}; {offered}")
    missing = sorted(p.value for p in properties - info.properties)
    if missing:
        raise UnsupportedPropertyError(
            "properties",
            f"model {info.id!r} cannot compute {', '.join(missing)}; "
            f"it offers {', '.join(sorted(p.value for p in info.properties))}",
        )
    allowed = np.asarray(info.elements, dtype=np.int64)
    for i, system in enumerate(systems):
        bad = ~np.isin(system.numbers, allowed)
        if bad.any():
            indices = np.flatnonzero(bad)
            elements = sorted({chemical_symbols[z] for z in system.numbers[indices]})
            shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
            raise UnsupportedElementError(
                f"systems[{i}].atomic_numbers[{indices[0]}]",
                f"model {info.id!r} was not trained on {', '.join(elements)} (atoms {shown})",
            )
        check_geometry(system, f"systems[{i}]", info.cutoff, max_neighbours_per_atom)


def cost_function(backend: Backend) -> Callable[[System], float]:
    """The backend's own ``cost(system)`` if it has one, else atoms plus neighbour pairs."""
    own = getattr(backend, "cost", None)
    if callable(own):
        return own
    cutoff = backend.info.cutoff
    return lambda system: pair_work(system, cutoff)


def warmup_system(info: ModelInfo) -> System:
    """A small periodic system of the model's first element, to run every code path once."""
    z = info.elements[0]
    return System(
        numbers=np.array([z, z]),
        positions=np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5]]),
        cell=np.eye(3) * 4.0,
        pbc=np.ones(3, dtype=bool),
    )

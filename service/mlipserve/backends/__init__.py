"""Model backends behind one interface, found by name: built-ins, then the ``mlipserve.backends``
entry-point group (how third-party packages add their own)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from mlipserve.backends.base import Backend
from mlipserve.config import ModelConfig

ENTRY_POINT_GROUP = "mlipserve.backends"
BUILTIN = {
    "chgnet": "mlipserve.backends.chgnet:CHGNetBackend",
    "mace": "mlipserve.backends.mace:MACEBackend",
    "sevennet": "mlipserve.backends.sevennet:SevenNetBackend",
    # Importable only in an environment with fairchem-core (e3nn >= 0.5): see deploy/models/fairchem.yaml.
    "fairchem": "mlipserve.backends.fairchem:FAIRChemBackend",
}


def backend_class(name: str) -> type:
    if name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return entry.load()
    known = sorted(BUILTIN) + sorted(e.name for e in entry_points(group=ENTRY_POINT_GROUP))
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")


def load_backend(config: ModelConfig, device: str) -> Backend:
    """Build the backend of ``config`` on ``device`` (loads weights: call once per replica)."""
    backend = backend_class(config.backend)(model_id=config.id, device=device, **config.options)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend {config.backend!r} does not implement mlipserve.backends.base.Backend")
    return backend

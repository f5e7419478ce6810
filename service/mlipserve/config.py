"""Typed configuration: which models to serve and how, as read from a serve config or the CLI."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "MLIPSERVE_"
DEFAULT_GRPC_PORT = 50051
DEFAULT_MODEL_ID = "chgnet-0.3.0"


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment variable MLIPSERVE_<name>."""
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its id, which backend builds it, and the resources of its replicas."""

    id: str
    backend: str
    # Keyword arguments of the backend's constructor (version, checkpoint path, dtype, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    num_replicas: int = 1
    # CPUs reserved per replica; torch in the replica uses this many threads.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Requests a replica holds at once: enough that batches can fill while one is computing.
    max_ongoing_requests: int = 64
    max_batch_atoms: int = 0
    max_wait_ms: float = 0.0
    max_queued_atoms: int = 1_000_000

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "models[]")


@dataclass(frozen=True)
class ServiceConfig:
    """The whole application: the models and the ingress in front of them."""

    models: tuple[ModelConfig, ...] = (
        ModelConfig(id=DEFAULT_MODEL_ID, backend="chgnet", options={"version": "0.3.0"}),
    )
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 1000
    # How long the ingress waits for a model's readiness answer in a health check.
    health_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        ids = [m.id for m in self.models]
        if not ids:
            raise ValueError("the service needs at least one model")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceConfig:
        data = dict(data)
        if "models" in data:
            data["models"] = tuple(ModelConfig.from_dict(m) for m in data["models"])
        return _from_dict(cls, data, "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls, data: Mapping[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)

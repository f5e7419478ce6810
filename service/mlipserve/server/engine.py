"""What the front door needs from whatever runs the models: metadata, readiness and results.

In a Serve replica the engine is a FamilyRouter (its own family in-process, the others by
DeploymentHandle); in-process it can be a ModelHost alone. Both speak typed requests and results:
protos stop at the front door.
"""

from __future__ import annotations

from typing import Protocol

from mlipserve_client.types import ComputeRequest, ModelInfo, Result


class Engine(Protocol):
    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every model the service offers, in config order."""
        ...

    async def info(self, model_id: str, wait_s: float | None = None) -> ModelInfo:
        """A model's metadata and status; ModelNotFoundError for an unknown id. ``wait_s`` bounds the
        wait for a model on another replica (then it is reported LOADING)."""
        ...

    async def compute(self, request: ComputeRequest, deadline: float | None) -> list[Result]:
        """Results for a request already validated against ``info`` (``deadline``: time.monotonic()
        by which the caller gives up; None: no deadline)."""
        ...

"""ModelServer: the Ray Serve deployment of one backend family, with the front door inside.

Each replica hosts its family's models (ModelHost: multiplexed checkpoints, batch queues) and runs
the gRPC front door on the service port, on the replica's own event loop: a request for one of its
models goes from the socket to the batch queue without a Ray hop (measured: a DeploymentHandle hop
costs ~4 ms here, more than the whole overhead budget). Replicas on one node share the port
(SO_REUSEPORT). Requests for another family's model are forwarded by handle (FamilyRouter).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from mlipserve.autoscaling import REQUESTS_HELD
from mlipserve.batching import BatchRecord
from mlipserve.capacity import ProbeResult
from mlipserve.config import ServiceConfig
from mlipserve.deployments.routing import FamilyRouter
from mlipserve.hosting import LoadFn, ModelHost
from mlipserve.metrics import BatchMetrics, RequestMetrics
from mlipserve.server.frontdoor import FrontDoor
from mlipserve_client.types import ComputeRequest, ModelInfo, Result

logger = logging.getLogger("mlipserve.model")


def deployment_name(family: str) -> str:
    return f"family:{family}"


def _multiplexed(load: LoadFn, capacity: int) -> LoadFn:
    """Serve's model multiplexer as the residency cache: it reports which models each replica holds,
    so that handles route a model's requests to a replica that has it loaded."""

    # A plain function: Serve's decorator keeps its state on the function object (not a bound method).
    async def load_model(model_id: str):
        return await load(model_id)

    return serve.multiplexed(max_num_models_per_replica=capacity)(load_model)


@serve.deployment
class ModelServer:
    async def __init__(self, family: str, config: ServiceConfig, *siblings: DeploymentHandle) -> None:
        # ``siblings``: the other families' deployments, bound to the application's root family only
        # so that Serve deploys them with it; replicas reach each other by name below.
        import torch

        deployment = config.deployment(family)
        # The replica owns its process; its CPU reservation is its thread budget.
        torch.set_num_threads(deployment.torch_threads)
        app_name = serve.get_replica_context().app_name
        metrics = BatchMetrics()
        self.host = ModelHost(family, config.families[family], deployment, residency=_multiplexed,
                              observer=metrics.observer)
        peers = {f: serve.get_deployment_handle(deployment_name(f), app_name=app_name)
                 for f in config.families if f != family}
        router = FamilyRouter(self.host, {m.id: m.family_name for m in config.models}, peers,
                              config.server.peer_retry_s)
        server = config.server
        if server.host == "node":
            server = dataclasses.replace(server, host=ray.util.get_node_ip_address())
        # Listening before the models load: health says NOT_SERVING, Compute UNAVAILABLE (retried).
        self.front_door = FrontDoor(router, server, config.health_timeout_s, RequestMetrics())
        await self.front_door.start()
        await self.host.load_all()
        await self.front_door.refresh_health()

    # --- called by other families' front doors -------------------------------------------------

    async def info(self) -> dict[str, ModelInfo]:
        return await self.host.infos()

    async def compute(self, request: ComputeRequest) -> list[Result]:
        return await self.host.compute(request)

    # --- called by Serve -----------------------------------------------------------------------

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What mlipserve.autoscaling sizes the family on (Serve cannot count front-door calls)."""
        return {REQUESTS_HELD: float(self.host.requests_held())}

    # --- introspection (tests, benchmarks) -----------------------------------------------------

    async def front_door_pid(self) -> int:
        return os.getpid()

    async def resident_models(self) -> list[str]:
        return self.host.resident_models()

    async def batch_history(self, model_id: str) -> list[BatchRecord]:
        return self.host.batch_history(model_id)

    async def probe_result(self, model_id: str) -> ProbeResult | None:
        return self.host.probe_result(model_id)

    async def neighbour_stats(self, model_id: str):
        return self.host.neighbour_stats(model_id)

    async def __del__(self) -> None:
        # Serve's graceful shutdown (serve.shutdown, a redeploy, SIGTERM of `mlipserve serve`): drain.
        await self.front_door.stop()
        await self.host.aclose()

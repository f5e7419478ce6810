"""The Ray Serve application: ``serve run mlipserve.app:app`` or, with arguments from a serve config
YAML, ``import_path: mlipserve.app:build_app`` (see deploy/serve_config.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from mlipserve.config import ServiceConfig
from mlipserve.deployments.ingress import MLIPIngress
from mlipserve.deployments.model import ModelServer

# What Serve's gRPC proxy must register: the API and the standard health service (both answered by
# MLIPIngress). Reflection is the proxy's own (grpc.reflection.v1alpha).
GRPC_SERVICER_FUNCTIONS = (
    "mlipserve_client.v1.service_pb2_grpc.add_MLIPServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


def deployment_name(model_id: str) -> str:
    return f"model:{model_id}"


def build(config: ServiceConfig) -> Application:
    models = {
        m.id: ModelServer.options(
            name=deployment_name(m.id),
            num_replicas=m.num_replicas,
            max_ongoing_requests=m.max_ongoing_requests,
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        ).bind(m)
        for m in config.models
    }
    return MLIPIngress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        # The ingress only parses and routes; it must not take a CPU a model could use.
        ray_actor_options={"num_cpus": 0},
    ).bind(config, models)


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder: ``args`` is the ``args:`` block of a serve config YAML."""
    return build(ServiceConfig.from_dict(args or {}))


app = build(ServiceConfig())

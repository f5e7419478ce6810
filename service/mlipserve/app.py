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


def deployment_name(family: str) -> str:
    return f"family:{family}"


def _family_deployment(config: ServiceConfig, family: str):
    deployment = config.deployment(family)
    actor_options = {"num_cpus": deployment.num_cpus, "num_gpus": deployment.num_gpus}
    if deployment.runtime_env:
        actor_options["runtime_env"] = dict(deployment.runtime_env)
    scaling = ({"autoscaling_config": dict(deployment.autoscaling)} if deployment.autoscaling
               else {"num_replicas": deployment.num_replicas})
    return ModelServer.options(
        name=deployment_name(family),
        max_ongoing_requests=deployment.max_ongoing_requests,
        ray_actor_options=actor_options,
        **scaling,
    ).bind(family, config.families[family], deployment)


def build(config: ServiceConfig) -> Application:
    families = {family: _family_deployment(config, family) for family in config.families}
    return MLIPIngress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        # The ingress only parses and routes; it must not take a CPU a model could use.
        ray_actor_options={"num_cpus": 0},
    ).bind(config, families)


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder: ``args`` is the ``args:`` block of a serve config YAML."""
    return build(ServiceConfig.from_dict(args or {}))


app = build(ServiceConfig())

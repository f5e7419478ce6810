"""The Ray Serve application: ``serve run mlipserve.app:app`` or, with arguments from a serve config
YAML, ``import_path: mlipserve.app:build_app`` (see deploy/serve_config.yaml).

One deployment per backend family; every replica runs the gRPC front door (mlipserve.server) on
the service port. Serve's own proxies carry no client traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from mlipserve.autoscaling import with_policy
from mlipserve.config import ServiceConfig
from mlipserve.deployments.model import ModelServer, deployment_name

# Serve's graceful shutdown of a replica must outlast the front door's drain.
_SHUTDOWN_MARGIN_S = 10.0


def _family_deployment(config: ServiceConfig, family: str, siblings: tuple = ()):
    deployment = config.deployment(family)
    actor_options = {"num_cpus": deployment.num_cpus, "num_gpus": deployment.num_gpus}
    if deployment.runtime_env:
        actor_options["runtime_env"] = dict(deployment.runtime_env)
    scaling = ({"autoscaling_config": with_policy(dict(deployment.autoscaling))} if deployment.autoscaling
               else {"num_replicas": deployment.num_replicas})
    if deployment.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = deployment.max_replicas_per_node
    return ModelServer.options(
        name=deployment_name(family),
        max_ongoing_requests=deployment.max_ongoing_requests,
        ray_actor_options=actor_options,
        graceful_shutdown_timeout_s=config.server.drain_grace_s + _SHUTDOWN_MARGIN_S,
        **scaling,
    ).bind(family, config, *siblings)


def build(config: ServiceConfig) -> Application:
    # An application has one root: the first family, carrying the others so that they deploy with it.
    first, *others = config.families
    siblings = tuple(_family_deployment(config, family) for family in others)
    return _family_deployment(config, first, siblings)


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder: ``args`` is the ``args:`` block of a serve config YAML."""
    return build(ServiceConfig.from_dict(args or {}))


app = build(ServiceConfig())

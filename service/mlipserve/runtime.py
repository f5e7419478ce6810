"""Start and stop an embedded local Ray with Serve and the application: the CLI's ``serve`` and the tests."""

from __future__ import annotations

import os
import socket

from mlipserve.app import build
from mlipserve.config import ServiceConfig

APP_NAME = "mlipserve"
# Ray's object store holds only request/response arrays here; its default (30% of RAM) wastes memory.
OBJECT_STORE_BYTES = 256 * 1024**2


# Serve logs a line per request by default: too much for a service answering every MD step.
LOGGING = {"enable_access_log": False}
# Read by Ray's processes at start: replica-to-replica calls over gRPC rather than Ray actor calls
# (measured here: ~19 ms instead of ~25 ms per served request), without gRPC's 4 MB message cap.
RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """A local Ray instance in this process (or, with ``address``, a connection to a running cluster),
    without the dashboard and with a small object store."""
    import ray

    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, namespace=APP_NAME, logging_level="WARNING")
        return
    ray.init(
        # A new local instance even where `ray start` runs a cluster on this machine (ray.init
        # would otherwise join it).
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        namespace=APP_NAME,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def start_serve() -> None:
    """Start Serve without its proxies: clients reach the front door in each model replica."""
    from ray import serve

    serve.start(logging_config=LOGGING, proxy_location="Disabled")


def deploy(config: ServiceConfig, name: str = APP_NAME) -> None:
    """Deploy (or redeploy) the application; returns when every replica is up and warmed."""
    from ray import serve

    serve.run(build(config), name=name, route_prefix=None, logging_config=LOGGING)


def stop_local() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()

"""FrontDoor: one grpc.aio server with the API, standard health and reflection, TLS and tokens.

``start()`` binds and returns the port (0 picks a free one: tests). Several replicas on one node
share the service port: gRPC's C core sets SO_REUSEPORT on Linux, and the kernel spreads
connections (not calls) across the listeners. ``stop(grace)`` is the drain: stop accepting, let
in-flight calls finish for ``grace`` seconds, then cancel what is left.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mlipserve.config import ServerConfig, TokenEntry
from mlipserve.server.auth import Authenticator, load_token_file, tokens_from_env
from mlipserve.server.engine import Engine
from mlipserve.server.health import HealthReporter
from mlipserve.server.interceptors import AuthInterceptor
from mlipserve.server.limits import transport_limit_bytes
from mlipserve.server.observer import NO_OBSERVER, RequestObserver
from mlipserve.server.servicer import MLIPServicer
from mlipserve.server.sessions import SessionServicer
from mlipserve.server.workflows import WorkflowServicer
from mlipserve_client.client import SERVICE_NAME
from mlipserve_client.v1 import service_pb2

logger = logging.getLogger("mlipserve.server")

# grpcio-reflection ships only v1alpha; v1 is the same messages under a new package name, so its
# servicer answers both (grpcurl and newer tools ask v1 first).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def accepted_tokens(config: ServerConfig) -> tuple[TokenEntry, ...]:
    """Tokens from the config, its token file and $MLIPSERVE_TOKENS, read where the server runs."""
    from_file = load_token_file(config.token_file) if config.token_file else ()
    unique: dict[str, TokenEntry] = {}
    for entry in (*config.tokens, *from_file, *tokens_from_env()):
        # The CLI hashes $MLIPSERVE_TOKENS into the config, and a local replica inherits it too.
        unique.setdefault(entry.sha256, entry)
    return tuple(unique.values())


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _add_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    names = (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
             REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})])


class FrontDoor:
    def __init__(self, engine: Engine, config: ServerConfig, info_wait_s: float = 2.0,
                 observer: RequestObserver = NO_OBSERVER) -> None:
        """``observer`` hears about every call (metrics: mlipserve.metrics.RequestMetrics)."""
        self.engine = engine
        self.config = config
        self.observer = observer
        self.health = HealthReporter(engine, wait_s=info_wait_s)
        self.servicer = MLIPServicer(engine, config.limits, info_wait_s, observer)
        self.sessions = SessionServicer(self.servicer, config)
        self.workflows = WorkflowServicer(self.servicer)
        tokens = accepted_tokens(config)
        self.authenticator = Authenticator(tokens, config.requests_per_second) if tokens else None
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        config = self.config
        if not is_loopback(config.host) and (not config.tls or self.authenticator is None):
            missing = " and ".join(m for m, ok in (("TLS", config.tls), ("tokens", self.authenticator)) if not ok)
            logger.warning("the front door listens on %s:%s without %s: anyone who can reach this address can "
                           "use the models%s", config.host, config.port, missing,
                           "" if config.tls else " and read the traffic")
        options = [
            ("grpc.max_receive_message_length", transport_limit_bytes(config.limits)),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1),
        ]
        if config.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
        interceptors = [AuthInterceptor(self.authenticator, self.observer)] if self.authenticator else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        methods = {**self.servicer.methods(), "Simulate": self.sessions.handler(), **self.workflows.methods()}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, methods)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        # By its descriptor: service_pb2_grpc does not load the service's own file, and reflection
        # describes only what is loaded (grpcurl would list the service but not its methods).
        _add_reflection(server, [service_pb2.DESCRIPTOR.services_by_name["MLIPService"].full_name])
        bind = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        self.port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
        await server.start()
        await self.health.start()
        self.server = server
        if config.health_port is not None:
            # Health alone, in plaintext: it tells whether the models serve, nothing else.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{config.host}:{config.health_port}")
            await self.health_server.start()
        logger.info("front door on %s (pid %d, %s, %s)", self.address, os.getpid(),
                    "TLS" + (" with client certificates" if config.tls_client_ca else "") if config.tls else "plaintext",
                    "tokens required" if self.authenticator else "no authentication")
        return self.port

    async def refresh_health(self) -> bool:
        return await self.health.refresh()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, sessions told to reconnect, new calls refused, in-flight ones finished
        within ``grace`` seconds."""
        if self.server is None:
            return
        server, self.server = self.server, None
        await self.health.drain()
        await self.sessions.drain()
        await self.workflows.drain()
        await server.stop(self.config.drain_grace_s if grace is None else grace)
        if self.health_server is not None:
            await self.health_server.stop(0)

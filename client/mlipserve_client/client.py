"""MLIPClient: one gRPC channel to an mlipserve server, with TLS, a token, deadlines and retries."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc
from ase import Atoms

from mlipserve_client import convert
from mlipserve_client.retries import FIRST_BACKOFF_S, MAX_BACKOFF_S, raise_service_error, retry_delay
from mlipserve_client.types import DEFAULT_PROPERTIES, ComputeRequest, Correction, ModelInfo, Property, Result, System
from mlipserve_client.v1 import models_pb2, service_pb2_grpc
from mlipserve_client.workflows import WorkflowMethods

logger = logging.getLogger("mlipserve_client")

DEFAULT_TIMEOUT_S = 60.0
SERVICE_NAME = "mlipserve.v1.MLIPService"
TOKEN_ENV = "MLIPSERVE_TOKEN"
def _read(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class MLIPClient(WorkflowMethods):
    """A connection to an mlipserve server at ``address`` ("host:port", or several front doors as
    "ipv4:host1:port,host2:port").

    ``model`` is the default model id for ``compute``; ``timeout`` (s) is the deadline of each call,
    retries included. ``token`` (default: $MLIPSERVE_TOKEN) is sent as ``authorization: Bearer``.
    ``tls``: False/None for plaintext, True to verify the server against the system's roots, or the
    root certificate (a PEM path or bytes) that signed the server's; ``tls_client_cert`` and
    ``tls_client_key`` for servers that require client certificates (mutual TLS); ``tls_server_name``
    when the certificate names another host than ``address``. Thread-safe: share one client.

    ``relax``, ``eos``, ``elastic``, ``phonons`` and ``diatomics`` run property workflows over many
    structures (mlipserve_client.workflows).
    """

    def __init__(
        self,
        address: str,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: bool = True,
        token: str | None = None,
        tls: bool | str | Path | bytes | None = None,
        tls_client_cert: str | Path | bytes | None = None,
        tls_client_key: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.tls = bool(tls)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        # The call metadata: the token lives only here; repr() and ASE's calculator parameters never show it.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            # The server accepts large systems; so must we when they come back with forces.
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            # Retries are ours (below): bounded by the call's deadline, not by a fixed attempt count.
            ("grpc.enable_retries", 0),
            # Several front doors ("ipv4:10.0.0.1:50051,10.0.0.2:50051", or a DNS name with several
            # addresses): calls spread over those that are up, and a lost one is skipped.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if tls:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=None if tls is True else _read(tls),
                private_key=_read(tls_client_key), certificate_chain=_read(tls_client_cert))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            if token and address.rsplit(":", 1)[0] not in ("localhost", "127.0.0.1", "[::1]"):
                logger.warning("sending a token to %s without TLS: anyone on the network can read it", address)
            self._channel = grpc.insecure_channel(address, options=options)
        self.stub = service_pb2_grpc.MLIPServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"MLIPClient({self.address!r}, model={self.model!r}, tls={self.tls})"

    def call(self, method: Callable, request, timeout: float | None = None):
        """``method(request)`` with this client's token, within one deadline, retried while the server
        says it could not take the call (UNAVAILABLE, RESOURCE_EXHAUSTED with a retry hint)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        backoff = FIRST_BACKOFF_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.001), metadata=self.metadata)
            except grpc.RpcError as err:
                delay = retry_delay(err, backoff) if self.retries else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise_service_error(err)
                logger.info("%s: %s, retrying in %.2f s", self.address, err.code().name, delay)
                time.sleep(delay * random.uniform(0.8, 1.2))
                backoff = min(2 * backoff, MAX_BACKOFF_S)

    def compute(
        self,
        systems: Atoms | System | Sequence[Atoms | System],
        properties: Iterable[Property | str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        task: str = "",
        corrections: Sequence[Correction] = (),
        timeout: float | None = None,
    ) -> list[Result]:
        """Evaluate one model on one or more systems in one call; results come back in order.

        ``task`` picks a head or fidelity of multi-task models (ModelInfo.tasks); ``corrections``
        (Electrostatics, Dispersion) are added to the model's energy, forces and stress, and each
        one's energy is reported in ``Result.corrections``."""
        if isinstance(systems, (Atoms, System)):
            systems = [systems]
        model = model or self.model
        if not model:
            raise ValueError("no model given: pass model= here or to MLIPClient")
        typed = tuple(s if isinstance(s, System) else convert.system_from_atoms(s) for s in systems)
        request = ComputeRequest(model=model, systems=typed, properties=frozenset(Property(p) for p in properties),
                                 task=task, corrections=tuple(corrections))
        response = self.call(self.stub.Compute, convert.compute_request_to_proto(request), timeout)
        results = [convert.result_from_proto(r, s.n_atoms) for r, s in zip(response.results, typed, strict=True)]
        for result in results:
            result.model_version = response.model_version
        return results

    def session(
        self,
        system: Atoms | System,
        properties: Iterable[Property | str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        task: str = "",
        corrections: Sequence[Correction] = (),
        timeout: float | None = None,
    ):
        """An MD session (mlipserve_client.session.Session) for ``system``: ``step(positions, cell)``
        per geometry, on one stream; ``timeout`` bounds each step, reopening included."""
        from mlipserve_client.session import Session

        model = model or self.model
        if not model:
            raise ValueError("no model given: pass model= here or to MLIPClient")
        typed = system if isinstance(system, System) else convert.system_from_atoms(system)
        return Session(self, typed, frozenset(Property(p) for p in properties), model=model, task=task,
                       corrections=corrections, timeout=timeout)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self.call(self.stub.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [convert.model_info_from_proto(m) for m in response.models]

    def get_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        response = self.call(self.stub.GetModel, models_pb2.GetModelRequest(model=model), timeout)
        return convert.model_info_from_proto(response.model)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MLIPClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

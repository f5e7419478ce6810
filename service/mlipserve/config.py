"""Typed configuration: which models to serve and how, as read from a serve config, a models catalog
or the CLI. Unknown keys are errors that name the key, so a typo never silently falls back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from mlipserve_client.types import Correction, Dispersion, Electrostatics

DEFAULT_GRPC_PORT = 50051
DEFAULT_MODEL_ID = "chgnet-0.3.0"


@dataclass(frozen=True)
class BatchingConfig:
    """How a model's requests are merged into forward passes (see mlipserve.batching)."""

    # Longest a request waits for others to join its batch (ms).
    max_wait_ms: float = 5.0
    # Work budget of one batch (the backend's cost units, ~ atoms + neighbour pairs). None: measured
    # at start-up by the probe; 0: never merge requests.
    budget: float | None = None
    # The probe picks the batch size with the best throughput whose latency stays under this (ms).
    max_batch_latency_ms: float = 1000.0
    # Work queued per model beyond which requests are refused (RESOURCE_EXHAUSTED with a retry hint).
    max_queued_work: float = 5e7
    # CPU only: memory one batch may take (MB), from the probe's measured memory per unit of work; a
    # batch predicted above it is split like a GPU batch that ran out of memory. None: no ceiling.
    memory_limit_mb: float | None = None
    # A request above this many atoms runs on its own lane so it never holds up small ones.
    large_system_atoms: int = 5000

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingConfig:
        return _from_dict(cls, data, "batching")


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its id and how its backend builds it."""

    id: str
    # Backend: "chgnet", "mace", "sevennet", "fairchem", or a plugin's entry-point name.
    backend: str
    # The Serve deployment (family) hosting it; default: one per backend. Models of one backend that
    # need another environment or device (e.g. a runtime_env with newer packages) get their own.
    family: str | None = None
    # Keyword arguments of the backend's constructor (version, checkpoint path, dtype, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Overrides the deployment's device for this model.
    device: str | None = None
    # The version every response names (ComputeResponse.model_version); default: the backend's
    # (e.g. CHGNet's "0.3.0"). Set it to label a new checkpoint or config when upgrading in place.
    version: str | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Physics corrections every request to this model id gets (a composite model, e.g.
    # "mace-small+pme+d3"): [{electrostatics: {method, charges, exclusion_radius}},
    # {dispersion: {functional, damping, cutoff}}].
    corrections: tuple[Correction, ...] = ()

    @property
    def family_name(self) -> str:
        return self.family or self.backend

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        data = dict(data)
        where = f"models[{data.get('id', '?')}]"
        if "batching" in data:
            data["batching"] = BatchingConfig.from_dict(data["batching"] or {})
        if "corrections" in data:
            data["corrections"] = tuple(_correction(c, f"{where}.corrections[{i}]")
                                        for i, c in enumerate(data["corrections"] or []))
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class DeploymentConfig:
    """Resources of one family's Serve deployment; its models are multiplexed on it."""

    num_replicas: int = 1
    # CPUs reserved per replica; torch in the replica uses this many threads.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = "cpu"
    # Requests a replica holds at once: enough that batches can fill while one is computing.
    max_ongoing_requests: int = 256
    # Models of the family loaded at once per replica (LRU); a request for another loads it.
    max_models_per_replica: int = 3
    # Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...);
    # replaces num_replicas when given.
    autoscaling: Mapping[str, Any] | None = None
    # At most this many replicas on one node (Serve's max_replicas_per_node): 1 spreads the family
    # over the cluster, a front door on every node that serves. None: Serve places them.
    max_replicas_per_node: int | None = None
    # Ray runtime_env of the replicas (e.g. pip packages of a family that needs its own environment).
    runtime_env: Mapping[str, Any] | None = None

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], family: str) -> DeploymentConfig:
        return _from_dict(cls, data, f"deployments[{family}]")


@dataclass(frozen=True)
class Limits:
    """What one request may hold. The defaults protect a GPU node from a request that would run out
    of memory or hold a replica for minutes; every refusal names the limit it hit."""

    # Largest request message (MiB); the transport accepts a little more so that the refusal can
    # name this setting instead of being gRPC's own.
    max_message_mb: float = 64.0
    max_systems_per_request: int = 1000
    max_atoms_per_system: int = 100_000
    max_atoms_per_request: int = 200_000
    # Mean neighbours per atom within the model's cutoff (dense solids have ~50-150 within 6 Å).
    max_neighbours_per_atom: float = 1000.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        return _from_dict(cls, data, "server.limits")


@dataclass(frozen=True)
class TokenEntry:
    """One accepted bearer token, kept as its SHA-256 digest: config objects travel between Ray
    processes and end up in logs and dumps, the plain token must not."""

    name: str  # what logs show instead of the token
    sha256: str  # hex digest of the token
    models: tuple[str, ...] | None = None  # None: every model
    requests_per_second: float | None = None  # None: the server's default
    burst: int | None = None  # requests allowed at once above the rate; None: 2 s worth


@dataclass(frozen=True)
class ServerConfig:
    """The front door: the gRPC server in each model replica that clients connect to."""

    # Loopback unless told otherwise; "node": the address Ray knows the replica's node by (a
    # multi-node cluster on private addresses, a front door per node).
    host: str = "127.0.0.1"
    port: int = DEFAULT_GRPC_PORT
    # A second, plaintext port that answers only grpc.health.v1, for probes that cannot speak TLS
    # (Kubernetes' gRPC probes). None: health is on the service port only.
    health_port: int | None = None
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    tls_client_ca: str | None = None  # when set, clients must present a certificate it signed (mTLS)
    # Tokens: a file (YAML list or one token per line; read where the replica runs, e.g. a mounted
    # Kubernetes Secret) and/or entries resolved by the CLI. No tokens: no authentication.
    token_file: str | None = None
    tokens: tuple[TokenEntry, ...] = ()
    requests_per_second: float | None = None  # default per-token rate; None: unlimited
    limits: Limits = field(default_factory=Limits)
    # MD sessions (Simulate): closed after this long without a step; at most this many open per
    # token, and per front door.
    session_idle_timeout_s: float = 300.0
    max_sessions_per_token: int = 64
    max_sessions: int = 1024
    # Connections older than this are asked to go (GOAWAY; calls in flight, MD sessions included,
    # finish on them) and clients reconnect: balancing is per connection, so this is what spreads
    # long-lived clients over replicas that were added (autoscaling, a node that rejoined). None: never.
    max_connection_age_s: float | None = 300.0
    # SIGTERM: stop accepting, then wait this long for in-flight calls.
    drain_grace_s: float = 10.0
    # How long a request for a model of another replica keeps retrying when that replica is lost.
    peer_retry_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server: give both tls_cert and tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("server: tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticates(self) -> bool:
        return bool(self.tokens) or self.token_file is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServerConfig:
        data = dict(data)
        if "limits" in data:
            data["limits"] = Limits.from_dict(data["limits"] or {})
        if "tokens" in data:
            data["tokens"] = tuple(_from_dict(TokenEntry, t, f"server.tokens[{i}]")
                                   for i, t in enumerate(data["tokens"] or []))
        return _from_dict(cls, data, "server")


@dataclass(frozen=True)
class ServiceConfig:
    """The whole application: the models, their families' deployments, and the front door."""

    models: tuple[ModelConfig, ...] = (
        ModelConfig(id=DEFAULT_MODEL_ID, backend="chgnet", options={"version": "0.3.0"}),
    )
    # Per family (ModelConfig.family_name); a family without an entry gets DeploymentConfig().
    deployments: Mapping[str, DeploymentConfig] = field(default_factory=dict)
    server: ServerConfig = field(default_factory=ServerConfig)
    # How long a front door waits for another family's readiness answer in health or ListModels (s).
    health_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        ids = [m.id for m in self.models]
        if not ids:
            raise ValueError("the service needs at least one model")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        unused = sorted(set(self.deployments) - set(self.families))
        if unused:
            raise ValueError(f"deployments for families without models: {', '.join(unused)}")

    @property
    def families(self) -> dict[str, tuple[ModelConfig, ...]]:
        """Family -> its models, in config order."""
        out: dict[str, list[ModelConfig]] = {}
        for model in self.models:
            out.setdefault(model.family_name, []).append(model)
        return {family: tuple(models) for family, models in out.items()}

    def deployment(self, family: str) -> DeploymentConfig:
        return self.deployments.get(family, DeploymentConfig())

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    def select(self, model_ids: list[str]) -> ServiceConfig:
        """This config narrowed to ``model_ids`` (in that order)."""
        unknown = [m for m in model_ids if self.model(m) is None]
        if unknown:
            raise ValueError(f"unknown model {', '.join(unknown)}; configured: {', '.join(m.id for m in self.models)}")
        models = tuple(self.model(m) for m in model_ids)
        families = {m.family_name for m in models}
        return dataclasses.replace(self, models=models,
                                   deployments={f: d for f, d in self.deployments.items() if f in families})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceConfig:
        data = dict(data)
        if "models" in data:
            data["models"] = tuple(ModelConfig.from_dict(m) for m in data["models"])
        if "deployments" in data:
            data["deployments"] = {f: DeploymentConfig.from_dict(d or {}, f) for f, d in data["deployments"].items()}
        if "server" in data:
            data["server"] = ServerConfig.from_dict(data["server"] or {})
        return _from_dict(cls, data, "config")

    @classmethod
    def catalog(cls) -> ServiceConfig:
        """Every model mlipserve can serve out of the box (service/mlipserve/models.yaml)."""
        import yaml

        text = resources.files("mlipserve").joinpath("models.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text))


def _correction(data: Mapping[str, Any], where: str) -> Correction:
    kinds = {"electrostatics": Electrostatics, "dispersion": Dispersion}
    if len(data) != 1 or next(iter(data)) not in kinds:
        raise ValueError(f"{where}: give exactly one of {', '.join(kinds)}, got {', '.join(data) or 'nothing'}")
    kind, params = next(iter(data.items()))
    return _from_dict(kinds[kind], params or {}, f"{where}.{kind}")


def _from_dict(cls, data: Mapping[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)

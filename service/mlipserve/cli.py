"""The ``mlipserve`` command: ``serve`` (embedded local Ray), ``models`` and ``compute FILE``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mlipserve.config import DEFAULT_GRPC_PORT, DEFAULT_MODEL_ID, ServiceConfig

DEFAULT_ADDRESS = f"localhost:{DEFAULT_GRPC_PORT}"


def load_service_config(path: Path | None, model_ids: list[str] | None, num_cpus: float | None) -> ServiceConfig:
    """The models to serve: from ``path`` (a models config, or a serve config YAML whose first
    application has ``args``; all its models by default) or else from the built-in catalog
    (chgnet-0.3.0 by default), narrowed to ``model_ids``, with ``num_cpus`` per replica if given."""
    if path is not None:
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        if "applications" in data:
            data = data["applications"][0].get("args") or {}
        config = ServiceConfig.from_dict(data)
    else:
        config = ServiceConfig.catalog()
        model_ids = model_ids or [DEFAULT_MODEL_ID]
    if model_ids:
        try:
            config = config.select(model_ids)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if num_cpus is not None:
        config = dataclasses.replace(config, deployments={
            f: dataclasses.replace(config.deployment(f), num_cpus=num_cpus) for f in config.families})
    return config


def _server_config(config: ServiceConfig, args: argparse.Namespace) -> ServiceConfig:
    """The front door's settings from the command line. Paths become absolute: the replicas that read
    them do not run in this directory."""
    from mlipserve.server.auth import tokens_from_env

    def path(value: Path | None) -> str | None:
        return str(value.resolve()) if value is not None else None

    given = {"host": args.host, "port": args.port, "tls_cert": path(args.tls_cert), "tls_key": path(args.tls_key),
             "tls_client_ca": path(args.tls_client_ca), "token_file": path(args.token_file)}
    # What the command line gives replaces the config file's server settings; the rest stays.
    server = dataclasses.replace(config.server, **{k: v for k, v in given.items() if v is not None},
                                 # Hashed here: replicas on other machines do not see this shell's environment.
                                 tokens=(*config.server.tokens, *tokens_from_env()))
    return dataclasses.replace(config, server=server)


def _warn_if_exposed(config: ServiceConfig) -> None:
    from mlipserve.server.frontdoor import is_loopback

    server = config.server
    if is_loopback(server.host) or (server.tls and server.authenticates):
        return
    missing = " and ".join(m for m, ok in (("TLS (--tls-cert/--tls-key)", server.tls),
                                           ("tokens (--token-file)", server.authenticates)) if not ok)
    bar = "!" * 78
    print(f"{bar}\nmlipserve: WARNING: listening on {server.host}:{server.port} without {missing}.\n"
          f"Anyone who can reach this address can use the models{'' if server.tls else ' and read the traffic'}.\n"
          f"{bar}", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from mlipserve import runtime

    config = _server_config(load_service_config(args.config, args.model, args.num_cpus), args)
    _warn_if_exposed(config)
    stop, started = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()
        if not started.is_set():
            raise KeyboardInterrupt  # still starting: abandon the start-up, then clean up below

    where = f"the Ray cluster at {args.address}" if args.address else "local Ray"
    print(f"mlipserve: starting {where} and {', '.join(m.id for m in config.models)} ...", flush=True)
    start = time.perf_counter()
    try:
        runtime.start_ray(address=args.address)
        # After ray.init: Ray installs its own fatal-signal handlers, which would abort the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        runtime.start_serve()
        runtime.deploy(config)
        started.set()
        scheme = "TLS" if config.server.tls else "plaintext"
        print(f"mlipserve: serving gRPC at {config.server.host}:{config.server.port} ({scheme}, "
              f"{'tokens required' if config.server.authenticates else 'no authentication'}; "
              f"{time.perf_counter() - start:.1f} s); Ctrl-C to stop", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        # Serve stops each replica gracefully: its front door refuses new calls, finishes in-flight
        # ones (server.drain_grace_s), then the models go.
        print("mlipserve: draining and shutting down", flush=True)
        runtime.stop_local()
    return 0


def _client(args: argparse.Namespace, **kwargs):
    from mlipserve_client import MLIPClient

    token = args.token_file.read_text().strip() if args.token_file else None
    return MLIPClient(args.address, timeout=args.timeout, token=token, tls=args.tls_ca or args.tls, **kwargs)


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list_models()
    print(f"{'model':<24} {'architecture':<12} {'status':<11} {'cutoff/Å':>8} {'dtype':<8} {'params':>10}  trained")
    for i in infos:
        print(f"{i.id:<24} {i.architecture:<12} {i.status.value:<11} {i.cutoff:>8.2f} {i.dtype:<8} "
              f"{i.num_parameters:>10,}  {'yes' if i.trained else 'no (random weights)'}")
        if i.status_message:
            print(f"    {i.status_message}")
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    from ase.io import read

    frames = read(args.file, index=args.index)
    frames = frames if isinstance(frames, list) else [frames]
    properties = ["energy", "forces"] + (["stress"] if all(a.cell.rank == 3 for a in frames) else [])
    with _client(args, model=args.model) as client:
        results = client.compute(frames, properties)
    print(f"{'frame':>5} {'atoms':>6} {'energy/eV':>16} {'eV/atom':>12} {'max|F|/eV/Å':>12}  stress/eV/Å³ (xx yy zz yz xz xy)")
    for k, (atoms, r) in enumerate(zip(frames, results)):
        fmax = float(np.abs(r.forces).max())
        stress = " ".join(f"{s: .5f}" for s in r.stress) if r.stress is not None else "-"
        print(f"{k:>5} {len(atoms):>6} {r.energy:>16.6f} {r.energy / len(atoms):>12.6f} {fmax:>12.6f}  {stress}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mlipserve", description="Serve machine-learned interatomic potentials over gRPC.")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local Ray with the service (default: CHGNet 0.3.0)",
                           description="Start an embedded local Ray instance serving the models over gRPC.")
    serve.add_argument("--host", help="address to listen on (default: the config's server.host, else 127.0.0.1: "
                                      "this machine only); 0.0.0.0 for every interface, then with --tls-cert/"
                                      "--tls-key and --token-file")
    serve.add_argument("--port", type=int, help=f"gRPC port (default: the config's server.port, else {DEFAULT_GRPC_PORT})")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TLS")
    serve.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path,
                       help="CA certificate (PEM): clients must present a certificate it signed (mutual TLS)")
    serve.add_argument("--token-file", type=Path,
                       help="accepted bearer tokens: one per line (plain or sha256:<hex>), or YAML with per-token "
                            "models and rates (see README); also $MLIPSERVE_TOKENS (comma-separated)")
    serve.add_argument("--address", help="an existing Ray cluster to deploy onto ('auto', ray://host:10001); "
                                         "default: start a local Ray")
    serve.add_argument("--config", type=Path,
                       help="models config YAML (or a serve config YAML); default: the built-in catalog")
    serve.add_argument("--model", action="append", metavar="ID",
                       help=f"serve this model (repeatable); default: all models of --config, or {DEFAULT_MODEL_ID} "
                            "from the catalog")
    serve.add_argument("--num-cpus", type=float, help="CPUs (= torch threads) per model replica")
    serve.set_defaults(func=cmd_serve)

    for name, func, help_text in (("models", cmd_models, "list the models a server offers"),
                                  ("compute", cmd_compute, "energy, forces and stress of a structure file")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (default %(default)s)")
        p.add_argument("--timeout", type=float, default=120.0, help="deadline per call in s")
        p.add_argument("--tls", action="store_true", help="TLS, verifying the server against the system's roots")
        p.add_argument("--tls-ca", type=Path, help="TLS, verifying the server against this root certificate (PEM)")
        p.add_argument("--token-file", type=Path, help="file holding the bearer token (default: $MLIPSERVE_TOKEN)")
        p.set_defaults(func=func)
        if name == "compute":
            p.add_argument("file", help="any file ASE can read (extxyz, cif, POSCAR, ...)")
            p.add_argument("--model", default=DEFAULT_MODEL_ID, help="model id (default %(default)s)")
            p.add_argument("--index", default=":", help="frames to compute, ASE index syntax (default all)")
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - a CLI reports, it does not dump tracebacks on users
        from mlipserve_client.errors import InvalidSystemError, ServiceError

        if isinstance(error, (ServiceError, InvalidSystemError)):
            print(f"mlipserve: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

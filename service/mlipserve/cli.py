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


def cmd_serve(args: argparse.Namespace) -> int:
    from mlipserve import runtime

    config = load_service_config(args.config, args.model, args.num_cpus)
    stop, started = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()
        if not started.is_set():
            raise KeyboardInterrupt  # still starting: abandon the start-up, then clean up below

    print(f"mlipserve: starting local Ray and {', '.join(m.id for m in config.models)} ...", flush=True)
    start = time.perf_counter()
    try:
        runtime.start_ray()
        # After ray.init: Ray installs its own fatal-signal handlers, which would abort the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        runtime.start_serve(args.port)
        runtime.deploy(config)
        started.set()
        print(f"mlipserve: serving gRPC at localhost:{args.port} ({time.perf_counter() - start:.1f} s); "
              "Ctrl-C to stop", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("mlipserve: shutting down", flush=True)
        runtime.stop_local()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mlipserve_client import MLIPClient

    with MLIPClient(args.address, timeout=args.timeout) as client:
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

    from mlipserve_client import MLIPClient

    frames = read(args.file, index=args.index)
    frames = frames if isinstance(frames, list) else [frames]
    properties = ["energy", "forces"] + (["stress"] if all(a.cell.rank == 3 for a in frames) else [])
    with MLIPClient(args.address, model=args.model, timeout=args.timeout) as client:
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
    serve.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default %(default)s)")
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

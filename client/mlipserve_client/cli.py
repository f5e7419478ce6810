"""The ``mlipserve-client`` command: property workflows against a server, from structure files.

    mlipserve-client relax|eos|elastic|phonons FILES... --model M [--options JSON] [--out results.json] [--plot DIR]
    mlipserve-client diatomics ELEMENTS... --model M [--heteronuclear] [--out ...] [--plot DIR]

FILES are anything ASE reads, every frame of each. The server is ``--address`` (default
$MLIPSERVE_ADDRESS, else localhost:50051); the token comes from ``--token-file`` or $MLIPSERVE_TOKEN.
A progress bar (tqdm) and plots (matplotlib) come with the ``cli`` extra,
``pip install 'mlipserve-client[cli]'``; without it progress is a line per structure and ``--plot``
says how to install it. The exit status is 0 when every structure succeeded, 1 when some failed
(their errors are in the output), 2 for a failure of the whole call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlipserve_client.errors import InvalidSystemError, ServiceError
from mlipserve_client.workflow_types import (
    DiatomicOptions,
    ElasticOptions,
    EOSOptions,
    PhononOptions,
    RelaxOptions,
    StructureError,
    StructureResult,
    WorkflowProgress,
    WorkflowSummary,
)

ADDRESS_ENV = "MLIPSERVE_ADDRESS"
DEFAULT_ADDRESS = "localhost:50051"
OPTIONS = {"relax": RelaxOptions, "eos": EOSOptions, "elastic": ElasticOptions, "phonons": PhononOptions,
           "diatomics": DiatomicOptions}
HELP = {
    "relax": "relax positions and, for fully periodic structures, the cell (no plot)",
    "eos": "Birch–Murnaghan equation of state (plot: E–V points and the fit)",
    "elastic": "elastic tensor and moduli in GPa (plot: the C_ij table)",
    "phonons": "harmonic phonons: Γ, band path, DOS, thermal properties (plot: bands and DOS)",
    "diatomics": "dimer energy curves of elements with MLIP Arena's checks (plot: every curve)",
}


def _symbol(numbers) -> str:
    from ase.data import chemical_symbols

    return "–".join(chemical_symbols[int(z)] for z in numbers)


# What one line of the table says about each workflow's result.
SUMMARIES = {
    "relax": lambda r: (f"E/atom {r.energy / len(r.numbers):.5f} eV, {r.steps} steps, "
                        f"{'converged' if r.converged else 'NOT converged'}, max |F| {r.max_force:.4f} eV/Å"),
    "eos": lambda r: (f"V0 {r.v0:.4f} Å³, E0 {r.e0:.5f} eV, B0 {r.b0_gpa:.2f} GPa, B0' {r.b0_prime:.3f}"
                      f"{'' if r.bracketed else ' (V0 outside the scan: extrapolated)'}"),
    "elastic": lambda r: (f"K_VRH {r.k_vrh_gpa:.2f} GPa, G_VRH {r.g_vrh_gpa:.2f} GPa, C11 {r.tensor_gpa[0, 0]:.1f}, "
                          f"C12 {r.tensor_gpa[0, 1]:.1f}, C44 {r.tensor_gpa[3, 3]:.1f} GPa"),
    "phonons": lambda r: (f"Γ {r.gamma_thz.min():.3f} to {r.gamma_thz.max():.3f} THz, supercell "
                          f"{'x'.join(str(int(n)) for n in r.supercell.diagonal())}, "
                          f"{r.n_displacements} displacements"),
    "diatomics": lambda r: (f"r_eq {r.checks.equilibrium_distance:.3f} Å, well {r.checks.well_depth:.4f} eV, "
                            f"{r.checks.force_flips} force flips"),
}


def read_structures(paths: Sequence[str]) -> list[tuple[str, object]]:
    """(label, Atoms) for every frame of every file; the label is ``file`` or ``file@frame``."""
    from ase.io import read

    structures = []
    for path in paths:
        frames = read(path, index=":")
        frames = frames if isinstance(frames, list) else [frames]
        for k, atoms in enumerate(frames):
            structures.append((path if len(frames) == 1 else f"{path}@{k}", atoms))
    return structures


def read_options(workflow: str, text: str | None):
    """The workflow's options from JSON (a literal, or @FILE), defaults for what it leaves out."""
    if not text:
        return OPTIONS[workflow]()
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise InvalidSystemError("options", f"give a JSON object, got {type(data).__name__}")
    try:
        return OPTIONS[workflow].from_dict(data)
    except InvalidSystemError as error:
        raise InvalidSystemError(f"options.{error.field.removeprefix('options.')}", error.message) from None


class Progress:
    """tqdm's bar over the structures when it is installed, else one line per finished structure."""

    def __init__(self, workflow: str, total: int, labels: Sequence[str], enabled: bool) -> None:
        self.labels = labels
        self.total = total
        self.finished = 0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=workflow, unit="structure", file=sys.stderr)

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if isinstance(event, WorkflowProgress) and self.bar is not None:
            forces = [s.max_force for s in event.structures if s.max_force is not None]
            self.bar.set_postfix_str(f"{len(event.structures)} in flight"
                                     + (f", max |F| {max(forces):.3f} eV/Å" if forces else ""))
        elif isinstance(event, StructureResult | StructureError):
            self.finished += 1
            if self.bar is not None:
                self.bar.update(1)
            else:
                state = "failed" if isinstance(event, StructureError) else "done"
                print(f"[{self.finished}/{self.total}] {self.labels[event.index]} {state}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from mlipserve_client.client import MLIPClient

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401 - only whether it is there
        except ImportError:
            from mlipserve_client.plots import INSTALL_HINT

            print(f"mlipserve-client: {INSTALL_HINT}", file=sys.stderr)
            return 2
    options = read_options(args.command, args.options)
    if args.command == "diatomics":
        from mlipserve_client.workflow_types import diatomic_systems

        elements = [e for item in (*args.elements, *(args.elements_option or ())) for e in item.split(",") if e]
        if not elements:
            raise InvalidSystemError("elements", "give one or more element symbols, e.g. Ge Te")
        labels = [_symbol(s.numbers) for s in diatomic_systems(elements, args.heteronuclear)]
        structures = None
    else:
        labelled = read_structures(args.files)
        labels, structures = [label for label, _ in labelled], [atoms for _, atoms in labelled]
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    progress = Progress(args.command, len(labels), labels, not args.quiet)
    summary: list[WorkflowSummary] = []

    def on_event(event) -> None:
        progress(event)
        if isinstance(event, WorkflowSummary):
            summary.append(event)

    common = {"model": args.model, "task": args.task, "timeout": args.timeout, "on_event": on_event}
    try:
        with MLIPClient(args.address, token=token, tls=args.tls_ca or args.tls) as client:
            if args.command == "diatomics":
                results = client.diatomics(elements, options, heteronuclear=args.heteronuclear, **common)
            else:
                results = getattr(client, args.command)(structures, options, **common)
    finally:
        progress.close()
    for label, result in zip(labels, results, strict=True):
        line = (f"{result.code}: {result.field}: {result.message}" if isinstance(result, StructureError)
                else SUMMARIES[args.command](result))
        print(f"{label}: {line}")
    if args.out is not None:
        report = {"workflow": args.command, "model": args.model, "options": options.to_dict(),
                  "structures": [{"label": label, ("error" if isinstance(r, StructureError) else "result"): r.to_dict()}
                                 for label, r in zip(labels, results, strict=True)],
                  "summary": summary[-1].to_dict() if summary else None}
        Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    if args.plot is not None:
        from mlipserve_client.plots import write_plots

        for path in write_plots(args.command, list(zip(labels, results, strict=True)), Path(args.plot)):
            print(f"wrote {path}")
    return 1 if any(isinstance(r, StructureError) for r in results) else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mlipserve-client", description="Property workflows on an mlipserve server.")
    sub = top.add_subparsers(dest="command", required=True)
    for name, help_text in HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "diatomics":
            p.add_argument("elements", nargs="*", help="element symbols, e.g. Ge Sb Te (or Ge,Sb,Te)")
            p.add_argument("--elements", dest="elements_option", action="append", metavar="LIST",
                           help="element symbols, comma-separated (repeatable)")
            p.add_argument("--heteronuclear", action="store_true", help="every pair of the elements, not only A–A")
        else:
            p.add_argument("files", nargs="+", help="structure files ASE reads (extxyz, cif, POSCAR, ...); all frames")
        p.add_argument("--model", required=True, help="model id (mlipserve models lists them)")
        p.add_argument("--task", default="", help="the model's task or modality, for multi-task models")
        p.add_argument("--options", help=f"{OPTIONS[name].__name__} as JSON, or @FILE, e.g. '{{\"fmax\": 0.02}}'")
        p.add_argument("--address", default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
                       help=f"server host:port (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})")
        p.add_argument("--token-file", help="file holding the bearer token (default: $MLIPSERVE_TOKEN)")
        p.add_argument("--tls", action="store_true", help="TLS, verifying the server against the system's roots")
        p.add_argument("--tls-ca", help="TLS, verifying the server against this root certificate (PEM)")
        p.add_argument("--timeout", type=float, default=3600.0, help="deadline of the whole workflow in s")
        p.add_argument("--out", help="write results, errors and the summary as JSON to this file")
        p.add_argument("--plot", help="write PNG plots into this directory (needs the cli extra)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (InvalidSystemError, ServiceError, OSError, ValueError) as error:
        print(f"mlipserve-client: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

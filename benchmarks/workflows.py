"""Property workflows served in batches, side by side in one run (CHGNet, rattled and strained bulk
cells of 8–64 atoms, cells relaxed):

- Relax of 32 structures, then EOS and elastic constants of 16: one served streaming call each
  (MLIPClient.relax / eos / elastic), against the same workflows run one structure after another
  with RemoteCalculator (every evaluation one round trip), and against the same engine over an
  in-process batch queue of the same backend and budget (run_workflow over a ModelHost, no gRPC,
  no Ray: the ceiling batching can reach here);
- the batch sizes the model saw, served and in-process.

    python benchmarks/workflows.py [--quick] [--num-cpus 2]

Writes results/workflows.json and results/workflows.png.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import statistics
import threading
import time
import warnings

import numpy as np
from ase import Atoms
from bench_common import RESULTS, family_handle, local_server, machine, small_systems, write_result

MODEL = "chgnet-0.3.0"
VARIANTS = ("served", "sequential_remote", "in_process_batched")


def structures(n: int) -> list[Atoms]:
    """8–64-atom Si, Cu, NaCl and Al cells, rattled, each strained by up to ±2 % so the cell relaxes."""
    rng = np.random.default_rng(13)
    out = []
    for atoms in small_systems(n, seed=13):
        atoms.set_momenta(np.zeros_like(atoms.positions))
        atoms.set_cell(atoms.cell.array * rng.uniform(0.98, 1.02), scale_atoms=True)
        out.append(atoms)
    return out


def workloads(quick: bool):
    """(name, options, number of structures) of each workflow measured."""
    from mlipserve_client.workflow_types import ElasticOptions, EOSOptions, RelaxOptions

    relax = RelaxOptions(fmax=0.05, max_steps=15 if quick else 300)
    if quick:
        return [("relax", relax, 6), ("eos", EOSOptions(relax=relax, n_points=5), 3),
                ("elastic", ElasticOptions(relax=relax, norm_strains=(-0.01, 0.01), shear_strains=(-0.02, 0.02)), 3)]
    return [("relax", relax, 32), ("eos", EOSOptions(relax=relax), 16), ("elastic", ElasticOptions(relax=relax), 16)]


class OneByOne:
    """The workflow engine's Session for one structure in this thread, every evaluation a round trip
    of RemoteCalculator, one after another: what a script looping over structures does."""

    def __init__(self, calc) -> None:
        self.calc = calc

    def calculator(self):
        return self.calc

    def evaluate(self, systems, properties):
        from mlipserve_client.convert import atoms_from_system
        from mlipserve_client.types import Result

        results = []
        for system in systems:
            atoms = atoms_from_system(system)
            atoms.calc = self.calc
            results.append(Result(energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                  stress=atoms.get_stress() if system.pbc.all() else None))
        return results

    def map(self, function, items):
        return [function(item) for item in items]

    def report(self, *args, **kwargs) -> None:
        pass

    def evaluations_done(self) -> None:
        pass


def sequential_remote(address: str, options, atoms_list: list[Atoms]) -> float:
    from mlipserve.workflows import WORKFLOWS
    from mlipserve_client import RemoteCalculator

    run = WORKFLOWS[type(options)].run
    start = time.perf_counter()
    for atoms in atoms_list:
        calc = RemoteCalculator(address, MODEL, timeout=600)
        run(atoms.copy(), OneByOne(calc), options)
        calc.close()
    return time.perf_counter() - start


class Batches:
    """Every batch a model ran from now on, from its history (the last 2,000 batches), polled often
    enough that none rotates out unseen."""

    def __init__(self, history: list) -> None:
        self.records: list = []
        self._last = history[-1] if history else None

    def poll(self, history: list) -> None:
        new = history
        for k in range(len(history) - 1, -1, -1):
            if history[k] == self._last:
                new = history[k + 1:]
                break
        self.records.extend(new)
        if history:
            self._last = history[-1]


def batch_sizes(records) -> dict:
    """How full the batches the model saw were."""
    if not records:
        return {"batches": 0}
    systems = [r.n_systems for r in records]
    return {"batches": len(records), "mean_systems": round(statistics.mean(systems), 2), "max_systems": max(systems),
            "mean_requests": round(statistics.mean(r.n_requests for r in records), 2),
            "mean_atoms": round(statistics.mean(r.n_atoms for r in records), 1),
            "histogram_systems": dict(sorted(collections.Counter(systems).items()))}


def served(address: str, options, atoms_list: list[Atoms]) -> tuple[float, dict, int]:
    """(seconds, batch sizes, evaluations) of one streaming call."""
    from mlipserve_client import MLIPClient
    from mlipserve_client.workflow_types import StructureError, WorkflowSummary

    def history() -> list:
        return family_handle("chgnet").batch_history.remote(MODEL).result()

    batches, done, summaries = Batches(history()), threading.Event(), []

    def record() -> None:
        while not done.wait(0.5):
            batches.poll(history())

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    with MLIPClient(address, model=MODEL) as client:
        start = time.perf_counter()
        run = {"RelaxOptions": client.relax, "EOSOptions": client.eos, "ElasticOptions": client.elastic}
        results = run[type(options).__name__](atoms_list, options, timeout=7200, on_event=lambda e: (
            summaries.append(e) if isinstance(e, WorkflowSummary) else None))
        seconds = time.perf_counter() - start
    done.set()
    recorder.join()
    batches.poll(history())
    failed = [r for r in results if isinstance(r, StructureError)]
    if failed:
        raise SystemExit(f"served workflow failed: {failed}")
    return seconds, batch_sizes(batches.records), summaries[-1].evaluations


def in_process_batched(threads: int, work: list) -> tuple[float, dict]:
    """(the probe's budget, {workflow: (seconds, batch sizes)}): each workload through run_workflow
    over a ModelHost of the model, in this process, its budget measured by the same start-up probe."""
    import torch
    from threadpoolctl import threadpool_limits

    from mlipserve.config import DeploymentConfig, Limits, ServiceConfig
    from mlipserve.hosting import ModelHost
    from mlipserve.server.servicer import prepare
    from mlipserve.workflows import run_workflow
    from mlipserve_client.convert import system_from_atoms
    from mlipserve_client.types import ComputeRequest

    torch.set_num_threads(threads)
    config = ServiceConfig.catalog().model(MODEL)

    async def main() -> tuple[float, dict]:
        host = ModelHost("chgnet", (config,), DeploymentConfig(num_cpus=threads))
        await host.load_all()
        info = await host.info(MODEL)

        async def evaluate(systems, properties):
            return await host.compute(prepare(info, ComputeRequest(MODEL, tuple(systems), properties), Limits()))

        async def record(batches: Batches) -> None:
            while True:
                await asyncio.sleep(0.2)
                batches.poll(host.batch_history(MODEL))

        out = {}
        try:
            for name, options, atoms_list in work:
                batches = Batches(host.batch_history(MODEL))
                recorder = asyncio.create_task(record(batches))
                start = time.perf_counter()
                async for _ in run_workflow(options, [system_from_atoms(a) for a in atoms_list], evaluate):
                    pass
                seconds = time.perf_counter() - start
                recorder.cancel()
                batches.poll(host.batch_history(MODEL))
                out[name] = (seconds, batch_sizes(batches.records))
        finally:
            await host.aclose()
        return host.probe_result(MODEL).budget, out

    # As in a replica: the workflow threads' small matrices on one BLAS thread (see mlipserve.workflows.runner).
    with threadpool_limits(1, user_api="blas"):
        return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few structures and steps: checks that it runs")
    parser.add_argument("--num-cpus", type=int, default=2, help="torch threads of the replica and the in-process run")
    args = parser.parse_args()
    # FrechetCellFilter's matrix logarithm of a nearly unstrained cell: accurate enough, said every step.
    warnings.filterwarnings("ignore", "logm result may be inaccurate")

    from mlipserve.config import BatchingConfig, DeploymentConfig, ServiceConfig

    work = [(name, options, structures(n)) for name, options, n in workloads(args.quick)]
    report = {"benchmark": "workflows", "machine": machine(), "model": MODEL, "torch_threads": args.num_cpus,
              "quick": args.quick, "load_average_at_start": os.getloadavg()[0], "workflows": {}}
    # First, before any server runs, so that the two never share the cores; the server then gets
    # the budget this probe measured, so that both batch alike.
    budget, in_process = in_process_batched(args.num_cpus, work)
    report["budget"] = budget
    model = dataclasses.replace(ServiceConfig.catalog().model(MODEL), batching=BatchingConfig(budget=budget))
    config = ServiceConfig(models=(model,), deployments={
        "chgnet": DeploymentConfig(num_cpus=args.num_cpus, max_ongoing_requests=512)})
    with local_server(config, num_cpus=max(2, args.num_cpus)) as address:
        for name, options, atoms_list in work:
            seconds, batches, evaluations = served(address, options, atoms_list)
            row = {"structures": len(atoms_list), "atoms": [len(a) for a in atoms_list], "options": options.to_dict(),
                   "served_s": round(seconds, 2), "served_batches": batches, "served_evaluations": evaluations,
                   "sequential_remote_s": round(sequential_remote(address, options, atoms_list), 2)}
            in_process_s, in_process_batches = in_process[name]
            row.update(in_process_batched_s=round(in_process_s, 2), in_process_batches=in_process_batches,
                       speedup_served_over_sequential=round(row["sequential_remote_s"] / row["served_s"], 2),
                       ratio_served_over_in_process=round(row["served_s"] / in_process_s, 2))
            report["workflows"][name] = row
            print(name, {k: v for k, v in row.items() if k not in ("atoms", "options")}, flush=True)
    path = write_result("workflows", report)
    _plot(report)
    print(f"wrote {path}")


def _plot(report: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(report["workflows"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for k, variant in enumerate(VARIANTS):
        ax.bar(np.arange(len(names)) + (k - 1) * 0.27, [report["workflows"][n][f"{variant}_s"] for n in names],
               width=0.27, label=variant.replace("_", " "))
    ax.set_xticks(range(len(names)), [f"{n} ({report['workflows'][n]['structures']})" for n in names])
    ax.set(ylabel="wall time (s)", title=f"{report['model']}, {report['torch_threads']} threads")
    ax.legend()
    for n in names:
        histogram = report["workflows"][n]["served_batches"].get("histogram_systems", {})
        bx.plot([int(s) for s in histogram], list(histogram.values()), "o-", label=n)
    bx.set(xlabel="systems per batch (served)", ylabel="batches", xscale="log", yscale="log")
    bx.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "workflows.png", dpi=120)


if __name__ == "__main__":
    main()

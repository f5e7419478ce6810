"""Many MD clients at once: served aggregate throughput against the in-process ceiling, batching on
against off, and the peer a user would pick instead (ASE's SocketIOCalculator, one model process per
client). One server, one run, side by side; ratios are what to read (this machine is shared).

    python benchmarks/serving.py [--clients 1 4 16 32] [--steps 20] [--model chgnet-0.3.0]
                                 [--device cpu|cuda] [--num-cpus 2] [--peer-max 4]

Writes results/serving.json and results/serving.png.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time

from bench_common import (
    family_handle,
    ipi_peer,
    local_server,
    machine,
    md_step_times,
    percentiles,
    small_systems,
    write_result,
    RESULTS,
)

EF = None  # set in main (imports deferred so that --help is instant)


def in_process_ceiling(backend, systems, repeats: int = 3) -> dict:
    """The best the model does directly on these systems: one by one or all merged, per MD step."""
    from mlipserve.backends.base import Batch
    from mlipserve_client.convert import system_from_atoms

    typed = [system_from_atoms(a) for a in systems]
    atoms = sum(s.n_atoms for s in typed)
    one_by_one, merged = [], []
    backend.compute(Batch(tuple(typed), EF))  # warm the merged path
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in typed:
            backend.compute(Batch((s,), EF))
        one_by_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        backend.compute(Batch(tuple(typed), EF))
        merged.append(time.perf_counter() - t0)
    best = min(statistics.median(one_by_one), statistics.median(merged))
    return {"atoms_steps_per_s": atoms / best,
            "one_by_one_s": statistics.median(one_by_one), "merged_s": statistics.median(merged)}


def run_clients(systems, make_calc, steps: int, warmup: int = 2) -> dict:
    """Each system runs MD in its own thread with its own calculator; throughput over all."""
    barrier = threading.Barrier(len(systems) + 1)
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(k):
        try:
            with make_calc(k) as calc:
                atoms = systems[k].copy()
                md_step_times(atoms, calc, warmup)
                barrier.wait()
                times = md_step_times(atoms, calc, steps)
                with lock:
                    latencies.extend(times)
        except BaseException as error:  # noqa: BLE001 - reported
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(systems))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    atoms_steps = sum(len(a) for a in systems) * steps
    return {"atoms_steps_per_s": atoms_steps / wall, "wall_s": wall, **percentiles(latencies)}


class _Remote:
    def __init__(self, address, model):
        from mlipserve_client import RemoteCalculator

        self.calc = RemoteCalculator(address, model=model, timeout=600)

    def __enter__(self):
        return self.calc

    def __exit__(self, *exc):
        self.calc.close()


def batch_sizes(model: str, family: str, since: int) -> tuple[dict, int]:
    history = family_handle(family).batch_history.remote(model).result()
    counts = collections.Counter(r.n_requests for r in history[since:])
    return {str(k): v for k, v in sorted(counts.items())}, len(history)


def main() -> None:
    global EF
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="chgnet-0.3.0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--peer-max", type=int, default=4,
                        help="most clients for the socket peer (it needs one model process per client)")
    args = parser.parse_args()

    import torch

    from mlipserve.backends.chgnet import CHGNetBackend
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServiceConfig
    from mlipserve_client.types import DEFAULT_PROPERTIES

    EF = DEFAULT_PROPERTIES
    torch.set_num_threads(args.num_cpus)
    version = args.model.removeprefix("chgnet-")
    unbatched = f"{args.model}-unbatched"
    config = ServiceConfig(
        models=(ModelConfig(id=args.model, backend="chgnet", options={"version": version}),
                ModelConfig(id=unbatched, backend="chgnet", options={"version": version},
                            batching=BatchingConfig(budget=0))),
        deployments={"chgnet": DeploymentConfig(num_cpus=args.num_cpus, device=args.device,
                                                num_gpus=1 if args.device.startswith("cuda") else 0,
                                                max_models_per_replica=2, max_ongoing_requests=512)},
    )
    backend = CHGNetBackend(version=version, device=args.device)
    rows = []
    with local_server(config, num_cpus=max(args.num_cpus, 2)) as address:
        probe = family_handle("chgnet").probe_result.remote(args.model).result()
        seen = {args.model: 0, unbatched: 0}
        for n in args.clients:
            systems = small_systems(n, seed=n)
            ceiling = in_process_ceiling(backend, systems)
            on = run_clients(systems, lambda k: _Remote(address, args.model), args.steps)
            on["batch_requests"], seen[args.model] = batch_sizes(args.model, "chgnet", seen[args.model])
            off = run_clients(systems, lambda k: _Remote(address, unbatched), args.steps)
            off["batch_requests"], seen[unbatched] = batch_sizes(unbatched, "chgnet", seen[unbatched])
            row = {"clients": n, "atoms": [len(a) for a in systems], "in_process_ceiling": ceiling,
                   "served_batching_on": on, "served_batching_off": off,
                   "ratio_served_over_ceiling": on["atoms_steps_per_s"] / ceiling["atoms_steps_per_s"],
                   "ratio_batching_on_over_off": on["atoms_steps_per_s"] / off["atoms_steps_per_s"]}
            if n <= args.peer_max:
                threads = max(1, args.num_cpus // n)
                peer = run_clients(systems, lambda k: ipi_peer(systems[k], args.model, f"mlipbench-{n}-{k}",
                                                               threads, args.device), args.steps)
                row["socket_peer"] = peer
                row["ratio_served_over_peer"] = on["atoms_steps_per_s"] / peer["atoms_steps_per_s"]
            rows.append(row)
            print(f"{n:>3} clients: served {on['atoms_steps_per_s']:8.0f}  off {off['atoms_steps_per_s']:8.0f}  "
                  f"ceiling {ceiling['atoms_steps_per_s']:8.0f}  peer "
                  f"{row.get('socket_peer', {}).get('atoms_steps_per_s', float('nan')):8.0f} atoms*steps/s", flush=True)
    report = {
        "benchmark": "serving", "model": args.model, "device": args.device, "machine": machine(),
        "torch_threads": args.num_cpus, "steps_per_client": args.steps,
        "probe": {"budget": probe.budget, "points": [
            {"systems": p.n_systems, "ms": round(p.seconds * 1e3, 1), "work_per_s": round(p.work_per_s)}
            for p in probe.points]},
        "rows": rows,
    }
    path = write_result("serving", report)
    _plot(report)
    print(f"wrote {path}")


def _plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    n = [r["clients"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(n, [r["in_process_ceiling"]["atoms_steps_per_s"] for r in rows], "k--", label="in-process ceiling")
    ax.plot(n, [r["served_batching_on"]["atoms_steps_per_s"] for r in rows], "o-", label="served, batching on")
    ax.plot(n, [r["served_batching_off"]["atoms_steps_per_s"] for r in rows], "s-", label="served, batching off")
    peer = [(r["clients"], r["socket_peer"]["atoms_steps_per_s"]) for r in rows if "socket_peer" in r]
    if peer:
        ax.plot(*zip(*peer), "^-", label="ASE SocketIOCalculator (i-PI)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent MD clients")
    ax.set_ylabel("atoms x steps / s")
    ax.set_title(f"{report['model']} on {report['device']}")
    ax.legend(fontsize=8)
    last = rows[-1]["served_batching_on"]["batch_requests"]
    bx.bar(list(last), list(last.values()))
    bx.set_xlabel("requests per forward pass")
    bx.set_ylabel("forward passes")
    bx.set_title(f"batch sizes, {rows[-1]['clients']} clients")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "serving.png", dpi=120)


if __name__ == "__main__":
    main()

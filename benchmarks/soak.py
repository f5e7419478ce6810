"""A bounded soak: ``--requests`` small requests (default 100,000) from 16 clients against a real
two-node Ray cluster on this machine (mlipserve.localcluster), spread over both nodes' front doors.
Reports throughput, p50/p99 latency, errors, and the resident memory of every model replica (each
holds its front door) and of the Serve controller at the start and at the end.

    python benchmarks/soak.py [--requests 100000] [--clients 16] [--model-cpus 0.5]

Writes results/soak.json and results/soak.png.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from bench_common import RESULTS, ROOT, machine, percentiles, write_result

TINY = ROOT / "tests" / "fixtures" / "mace" / "tiny_mace_untrained"
WORKER = "127.0.0.2"


def rss_mb() -> dict[str, float]:
    """Resident memory of the cluster's Serve processes (replicas with their front doors, controller)."""
    from mlipserve.localcluster import command_line

    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        line = command_line(int(entry.name))
        if line.startswith(("ray::ServeReplica", "ray::ServeController")):
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:"))
            out[f"{line.split()[0]} (pid {entry.name})"] = round(kb / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model-cpus", type=float, default=0.5)
    args = parser.parse_args()

    from mlipserve.localcluster import local_cluster, serving
    from mlipserve.runtime import free_port
    from mlipserve_client import MLIPClient

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, local_cluster((WORKER,)) as cluster:
        config = Path(tmp) / "soak.yaml"
        config.write_text(
            f"models:\n  - id: tiny\n    backend: mace\n    options: {{state_dict: {TINY}.state_dict.pt, "
            f"config: {TINY}.config.json, dtype: float64}}\n"
            f"deployments:\n  mace: {{num_replicas: 2, max_replicas_per_node: 1, num_cpus: {args.model_cpus}}}\n"
            "server: {host: node}\n")
        log = Path(tmp) / "serve.log"
        with serving(cluster, config, port, log):
            deadline = time.monotonic() + 300
            while "serving gRPC at" not in log.read_text():
                if time.monotonic() > deadline:
                    raise SystemExit(log.read_text()[-3000:])
                time.sleep(0.5)
            doors = "ipv4:" + ",".join((f"{cluster.head_ip()}:{port}", f"{WORKER}:{port}"))
            water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
            with MLIPClient(doors, model="tiny", timeout=60) as warm:
                for _ in range(50):
                    warm.compute(water)
            memory_start = rss_mb()
            per_client = args.requests // args.clients
            latencies: list[list[tuple[float, float]]] = [[] for _ in range(args.clients)]
            errors: list[str] = []
            start = time.perf_counter()

            def client(k: int) -> None:
                with MLIPClient(doors, model="tiny", timeout=120) as own:
                    for _ in range(per_client):
                        t0 = time.perf_counter()
                        try:
                            own.compute(water)
                        except Exception as error:  # noqa: BLE001 - counted
                            errors.append(repr(error))
                        latencies[k].append((t0 - start, time.perf_counter() - t0))

            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            memory_end = rss_mb()
    samples = sorted(x for per in latencies for x in per)
    report = {
        "benchmark": "soak", "machine": machine(), "nodes": 2, "clients": args.clients,
        "requests": len(samples), "errors": len(errors), "first_errors": errors[:5],
        "wall_s": round(wall, 1), "requests_per_s": round(len(samples) / wall, 1),
        **percentiles([s[1] for s in samples]),
        "rss_mb_start": memory_start, "rss_mb_end": memory_end,
        "rss_growth": {k: round(memory_end[k] / v - 1, 3) for k, v in memory_start.items() if k in memory_end},
    }
    path = write_result("soak", report)
    _plot(report, samples)
    print({k: v for k, v in report.items() if k not in ("first_errors",)})
    print(f"wrote {path}")


def _plot(report: dict, samples: list[tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s[0] for s in samples])
    latency = np.array([s[1] for s in samples]) * 1e3
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(0, t.max(), 60)
    which = np.digitize(t, edges)
    centres, p50, p99 = [], [], []
    for k in range(1, len(edges)):
        chunk = latency[which == k]
        if len(chunk):
            centres.append(edges[k - 1])
            p50.append(np.percentile(chunk, 50))
            p99.append(np.percentile(chunk, 99))
    ax.plot(centres, p50, label="p50")
    ax.plot(centres, p99, label="p99")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title(f"{report['requests']:,} requests, {report['clients']} clients, 2 nodes, {report['errors']} errors")
    ax.legend()
    names = list(report["rss_mb_start"])
    x = np.arange(len(names))
    bx.bar(x - 0.2, [report["rss_mb_start"][n] for n in names], 0.4, label="start")
    bx.bar(x + 0.2, [report["rss_mb_end"].get(n, 0) for n in names], 0.4, label="end")
    bx.set_xticks(x, [n.split(":")[-1] for n in names], rotation=30, fontsize=7)
    bx.set_ylabel("RSS (MB)")
    bx.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "soak.png", dpi=120)


if __name__ == "__main__":
    main()

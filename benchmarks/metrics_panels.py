"""The dashboard's request panels, drawn from a real local run: a local server (CHGNet 0.3.0 and a
composite CHGNet + D3(BJ), tokens on), a short mixed load (unary calls from a few clients, an MD
session, corrections, bad requests and refused tokens), and this node's Ray metrics endpoint
scraped every few seconds; rates and quantiles are computed as the Grafana queries compute them.

    python benchmarks/metrics_panels.py [--seconds 90] [--scrape-s 2]

Writes results/metrics_panels.png and results/metrics_panels.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import threading
import time
import urllib.request

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from bench_common import RESULTS, local_server, machine, small_systems, write_result

TOKEN = "metrics-panels-benchmark-token"
MODEL = "chgnet-0.3.0"
CORRECTED = f"{MODEL}+d3"
QUANTILES = (0.5, 0.99)
PARTS = (("queue_wait", "queue wait"), ("model", "model"), ("corrections", "corrections"),
         ("serialization", "front door: decode, validate, encode"))


def service_config():
    from mlipserve.config import DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig, TokenEntry
    from mlipserve.server.auth import hash_token
    from mlipserve_client.types import Dispersion

    chgnet = ServiceConfig.catalog().model(MODEL)
    corrected = ModelConfig(id=CORRECTED, backend="chgnet", options=chgnet.options,
                            corrections=(Dispersion("pbe", "bj"),))
    return ServiceConfig(models=(chgnet, corrected), deployments={"chgnet": DeploymentConfig(num_cpus=2)},
                         server=ServerConfig(tokens=(TokenEntry(name="bench", sha256=hash_token(TOKEN)),)))


# --- scraping ------------------------------------------------------------------------------------


def metrics_endpoints() -> list[str]:
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def scrape(urls: list[str]) -> dict[tuple[str, frozenset], float]:
    """Every ray_mlipserve_ sample, summed over replicas and nodes: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    dropped = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "replica", "deployment",
               "application", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
    out: dict[tuple[str, frozenset], float] = collections.defaultdict(float)
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            families = text_string_to_metric_families(response.read().decode())
            for family in families:
                if not family.name.startswith("ray_mlipserve_"):
                    continue
                for sample in family.samples:
                    labels = frozenset((k, v) for k, v in sample.labels.items() if k not in dropped)
                    out[sample.name, labels] += sample.value
    return out


def series(scrapes, name: str, by: tuple[str, ...], **match: str) -> dict[tuple[str, ...], np.ndarray]:
    """Per group of ``by`` labels, the summed value of ``name`` at every scrape."""
    groups: dict[tuple[str, ...], np.ndarray] = {}
    for k, (_, values) in enumerate(scrapes):
        for (sample, labels), value in values.items():
            labels = dict(labels)
            if sample != name or any(labels.get(key) != v for key, v in match.items()):
                continue
            key = tuple(labels.get(b, "") for b in by)
            groups.setdefault(key, np.zeros(len(scrapes)))[k] += value
    return groups


def rates(times: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Per second over the last ``window`` scrapes, as Prometheus' rate(): NaN before enough scrapes."""
    out = np.full(len(values), np.nan)
    out[window:] = (values[window:] - values[:-window]) / (times[window:] - times[:-window])
    return out


# Fewer observations in a window than this draw no quantile (the tail of the run, a lone slow call).
MIN_OBSERVATIONS = 5


def histogram_quantile(q: float, bounds: np.ndarray, cumulative: np.ndarray) -> float:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    total = cumulative[-1]
    if total < MIN_OBSERVATIONS:
        return np.nan
    rank = q * total
    k = int(np.searchsorted(cumulative, rank))
    if k >= len(bounds) - 1:  # the +Inf bucket: its lower bound
        return float(bounds[-2])
    lower, below = (0.0, 0.0) if k == 0 else (bounds[k - 1], cumulative[k - 1])
    inside = cumulative[k] - below
    return float(lower + (bounds[k] - lower) * ((rank - below) / inside if inside else 1.0))


def quantiles(scrapes, metric: str, q: float, window: int, by: tuple[str, ...] = (), **match: str):
    """``histogram_quantile(q, sum by (by, le) (rate(metric_bucket[window])))`` at every scrape."""
    buckets = series(scrapes, f"{metric}_bucket", (*by, "le"), **match)
    times = np.array([t for t, _ in scrapes])
    out: dict[tuple[str, ...], np.ndarray] = {}
    for key in {k[:-1] for k in buckets}:
        bounds = sorted((float(k[-1]), k) for k in buckets if k[:-1] == key)
        edges = np.array([b for b, _ in bounds])
        counts = np.array([buckets[k] for _, k in bounds])  # (buckets, scrapes), cumulative in le
        values = np.full(len(times), np.nan)
        for i in range(window, len(times)):
            values[i] = histogram_quantile(q, edges, counts[:, i] - counts[:, i - window])
        out[key] = values
    return out


# --- load ----------------------------------------------------------------------------------------


def drive(address: str, seconds: float) -> dict[str, int]:
    """Mixed load for ``seconds``: three unary clients, one MD session, corrections now and then,
    bad requests and refused tokens; returns how many of each were sent."""
    from mlipserve_client import MLIPClient, RemoteCalculator
    from mlipserve_client.errors import ServiceError

    stop = time.monotonic() + seconds
    sent: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(what: str) -> None:
        with lock:
            sent[what] += 1

    def unary(seed: int) -> None:
        systems = small_systems(8, seed=seed)
        with MLIPClient(address, model=MODEL, token=TOKEN, timeout=60) as client:
            k = 0
            while time.monotonic() < stop:
                client.compute(systems[k % len(systems)])
                count("compute")
                k += 1
                time.sleep(0.05 * seed)

    def session() -> None:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.03, seed=1)
        calc = RemoteCalculator(address, MODEL, token=TOKEN, timeout=60)
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        while time.monotonic() < stop:
            dyn.run(5)
            count("session_steps")
            # Pauses: the open-session gauge stays up, the step rate moves.
            time.sleep(0.5)
        calc.close()

    def odd_ones() -> None:
        si = bulk("Si", "diamond", a=5.43, cubic=True)
        with MLIPClient(address, model=MODEL, token=TOKEN, timeout=60, retries=False) as client, \
                MLIPClient(address, model=MODEL, token="not-the-token", timeout=10, retries=False) as stranger:
            while time.monotonic() < stop:
                client.compute(si, model=CORRECTED)
                count("corrections")
                client.list_models()
                for model in ("m" * 10_000, "no-such-model"):
                    try:
                        client.compute(si, model=model)
                    except ServiceError:
                        count("bad_requests")
                try:
                    stranger.compute(si)
                except ServiceError:
                    count("refused_tokens")
                time.sleep(2.0)

    threads = [threading.Thread(target=unary, args=(k,)) for k in (1, 2, 3)]
    threads += [threading.Thread(target=session), threading.Thread(target=odd_ones)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(sent)


# --- panels --------------------------------------------------------------------------------------


def draw(scrapes, window: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = np.array([t for t, _ in scrapes])
    t = times - times[0]
    fig, axes = plt.subplots(3, 3, figsize=(16, 11), constrained_layout=True)

    def plot(ax, curves: dict[str, np.ndarray], title: str, unit: str) -> None:
        for label, values in sorted(curves.items()):
            if np.any(np.nan_to_num(values)):
                ax.plot(t, values, label=label, lw=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")

    def counter_rates(name, by, fmt, **match):
        return {fmt(*k): rates(times, v, window) for k, v in series(scrapes, name, by, **match).items()}

    plot(axes[0, 0], counter_rates("ray_mlipserve_requests_total", ("rpc", "code"), lambda r, c: f"{r} {c}"),
         "Requests/s by RPC and status", "req/s")
    plot(axes[0, 1], counter_rates("ray_mlipserve_requests_total", ("model", "code"),
                                   lambda m, c: f"{m or '(none)'} {c}"),
         "Requests/s by model and status", "req/s")
    latency = {}
    for q in QUANTILES:
        for (rpc,), values in quantiles(scrapes, "ray_mlipserve_request_seconds", q, window, ("rpc",)).items():
            latency[f"p{round(q * 100)} {rpc}"] = values * 1e3
    plot(axes[0, 2], latency, "Latency by RPC (p50, p99)", "ms")
    for ax, q in zip(axes[1, :2], QUANTILES, strict=True):
        parts = {label: quantiles(scrapes, f"ray_mlipserve_{part}_seconds", q, window).get((), np.array([])) * 1e3
                 for part, label in PARTS}
        plot(ax, {k: v for k, v in parts.items() if len(v)}, f"Where the time goes (p{round(q * 100)})", "ms")
    plot(axes[1, 2], {rpc: v for (rpc,), v in series(scrapes, "ray_mlipserve_requests_in_flight", ("rpc",)).items()},
         "Calls in flight by RPC", "calls")
    sessions = {f"open {m}": v for (m,), v in series(scrapes, "ray_mlipserve_sessions_open", ("model",)).items()}
    sessions |= counter_rates("ray_mlipserve_session_steps_total", ("model",), lambda m: f"steps/s {m}")
    plot(axes[2, 0], sessions, "MD sessions: open, steps/s", "sessions | steps/s")
    traffic = counter_rates("ray_mlipserve_request_bytes_total", ("rpc",), lambda r: f"in {r}")
    traffic |= counter_rates("ray_mlipserve_response_bytes_total", ("rpc",), lambda r: f"out {r}")
    plot(axes[2, 1], {k: v / 1e3 for k, v in traffic.items()}, "Bytes received and sent by RPC", "kB/s")
    plot(axes[2, 2], counter_rates("ray_mlipserve_auth_failures_total", ("reason",), lambda r: r),
         "Auth failures/s by reason", "1/s")
    fig.suptitle(f"mlipserve request metrics, scraped from Ray's metrics endpoint ({machine()}; rates over "
                 f"{times[window] - times[0]:.0f} s windows)", fontsize=12)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load runs")
    parser.add_argument("--scrape-s", type=float, default=2.0, help="seconds between scrapes")
    parser.add_argument("--window-s", type=float, default=10.0, help="rates and quantiles over this window")
    args = parser.parse_args()
    # Ray's workers report their metrics every 10 s by default: every 2 s here, for smoother curves.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

    with local_server(service_config(), num_cpus=4) as address:
        urls = metrics_endpoints()
        scrapes = [(time.time(), scrape(urls))]
        done = threading.Event()
        load = {}
        driver = threading.Thread(target=lambda: (load.update(drive(address, args.seconds)), done.set()))
        driver.start()
        # A few scrapes after the load ends: the last reports arrive, the gauges fall back.
        while not done.is_set():
            time.sleep(args.scrape_s)
            scrapes.append((time.time(), scrape(urls)))
        for _ in range(int(6 / args.scrape_s) + 1):
            time.sleep(args.scrape_s)
            scrapes.append((time.time(), scrape(urls)))
        driver.join()

    window = max(1, round(args.window_s / args.scrape_s))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "metrics_panels.png"
    draw(scrapes, window, path)
    last = scrapes[-1][1]
    totals = {f"{name}{{{', '.join(f'{k}={v}' for k, v in sorted(labels))}}}": value
              for (name, labels), value in sorted(last.items(), key=lambda item: item[0][0])
              if name.endswith("_total") or name.endswith("_count")}
    write_result("metrics_panels", {"machine": machine(), "seconds": args.seconds, "scrapes": len(scrapes),
                                    "sent": load, "totals": totals})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

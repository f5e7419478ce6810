"""Every benchmark in one command: remote vs local MD step and memory (CHGNet, MACE-MP-0-small-shaped,
SevenNet-0), serving throughput (ceiling, batching on/off, the i-PI socket peer), the cost of the
corrections, the front door, MD sessions and property workflows.

Each benchmark runs in its own process (each starts and stops its own local Ray), one after the
other so that they do not compete for the CPUs. Their JSON and PNG land in results/; this script
then writes results/summary.json and results/summary.md (the table the README quotes) from the
latest result of every benchmark, so that `--only NAME` reruns one and keeps the others.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--num-cpus 2] [--only md_step serving corrections]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_common import RESULTS, machine

HERE = Path(__file__).resolve().parent
MD_MODELS = ("chgnet-0.3.0", "mace-mp-0-small-random", "sevennet-0")


def commands(args) -> dict[str, list[str]]:
    """name → argv of each benchmark, sized by --quick."""
    py = sys.executable
    cpus = ["--num-cpus", str(args.num_cpus)]
    runs: dict[str, list[str]] = {}
    for model in MD_MODELS:
        rounds = ["--rounds", "3", "--steps", "5"] if args.quick else []
        runs[f"md_step_{model}"] = [py, "md_step.py", "--model", model, "--device", args.device, *cpus, *rounds]
    clients = ["--clients", "1", "4", "--steps", "8"] if args.quick else []
    runs["serving"] = [py, "serving.py", "--device", args.device, *cpus, *clients]
    runs["corrections"] = [py, "corrections.py", "--threads", str(args.num_cpus // 2 or 1),
                           *(["--quick"] if args.quick else [])]
    runs["frontdoor"] = [py, "frontdoor.py", *cpus, *(["--calls", "40", "--seconds", "8"] if args.quick else [])]
    runs["sessions"] = [py, "sessions.py", *cpus,
                        *(["--steps", "15", "--nve-steps", "200", "--seconds", "8"] if args.quick else [])]
    runs["workflows"] = [py, "workflows.py", *cpus, *(["--quick"] if args.quick else [])]
    return {name: argv for name, argv in runs.items() if any(name.startswith(o) for o in args.only)}


def summary_rows(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(what, measured, goal) rows from the benchmarks' own JSON."""
    rows = []
    for model in MD_MODELS:
        md = results.get(f"md_step_{model}")
        if md:
            rows.append((f"remote / local MD step, {model}, 64-atom Si",
                         f"{md['ratio_remote_over_package_calculator']} (vs the same backend in-process: "
                         f"{md['ratio_remote_over_backend_in_process']})", "≤ 1.05"))
            rows.append((f"server start → first answer, {model}", f"{md['server_start_to_first_answer_s']} s", ""))
            rows.append((f"MD step served / local, {model} (ms)",
                         f"{md['median_step_ms']['remote']} / {md['median_step_ms']['local_package_calculator']}", ""))
            rows.append((f"memory: replica / local process, {model} (MB RSS)",
                         f"{md['replica_rss_mb']} / {md['local_process_rss_mb']}", ""))
    serving = results.get("serving")
    if serving:
        for row in serving["rows"]:
            n, on = row["clients"], row["served_batching_on"]
            rows.append((f"served / in-process ceiling, {n} clients ({serving['model']}, 8–64 atoms)",
                         f"{row['ratio_served_over_ceiling']:.2f} (p50 {on['p50_ms']} ms, p99 {on['p99_ms']} ms)",
                         "≥ 0.9"))
            rows.append((f"batching on / off, {n} clients", f"{row['ratio_batching_on_over_off']:.2f}", "≥ 1.0 on CPU"))
            if "ratio_served_over_peer" in row:
                rows.append((f"served / ASE SocketIOCalculator peer, {n} clients",
                             f"{row['ratio_served_over_peer']:.2f}", ""))
    frontdoor = results.get("frontdoor")
    if frontdoor:
        rows.append(("bare grpcio echo on loopback (the floor)", f"{frontdoor['echo_floor_ms']:.2f} ms", ""))
        for variant, label in (("before_proxy", "Serve gRPC proxy (before)"), ("front_door", "front door"),
                               ("front_door_tls_token", "front door, TLS + token")):
            if variant in frontdoor:
                v = frontdoor[variant]
                rows.append((f"serving overhead per Compute, 2 / 64-atom Si, {label}",
                             f"{v['overhead_si2_ms']:.2f} / {v['overhead_si64_ms']:.2f} ms", "≤ 2 ms"))
                rows.append((f"16 clients, 8–16 atoms, E+F+S / in-process ceiling, {label}",
                             f"{v['ratio_16_clients_over_ceiling']:.2f}", "≥ 0.9"))
        extra = frontdoor["tls_token_minus_plaintext_ms"]
        rows.append(("TLS + token minus plaintext overhead, 2 / 64 atoms",
                     f"{extra['si2']:.2f} / {extra['si64']:.2f} ms", "≤ 0.3 ms"))
    sessions = results.get("sessions")
    if sessions:
        for model, row in sessions["models"].items():
            rows.append((f"forces-then-stress MD step, served / in-process calculator, {model}, 64 atoms",
                         f"{row['ratio_forces_then_stress_over_local']:.2f} "
                         f"({row['round_trips_per_step']:.2f} round trips per step)", "≤ 1.15"))
            rows.append((f"NVE step overhead, session / unary, {model}, 64 atoms",
                         f"{row['session_overhead_ms']:.2f} / {row['unary_overhead_ms']:.2f} ms", "≤ 1 ms, below unary"))
            if row.get("rebuild_fraction") is not None:
                rows.append((f"neighbour-list rebuilds, {row['nve_steps']} NVE steps, {model}",
                             f"{row['rebuild_fraction']:.1%} (model time saved per step: "
                             f"{row['model_time_saved_by_reuse_ms']:.2f} ms)", "≤ 10 %"))
        if "sixteen_sessions" in sessions:
            rows.append(("16 sessions, 8–16 atoms / in-process ceiling",
                         f"{sessions['sixteen_sessions']['ratio']:.2f}", "≥ 0.9"))
    workflows = results.get("workflows")
    if workflows:
        for name, row in workflows["workflows"].items():
            rows.append((f"{name} of {row['structures']} structures ({workflows['model']}, 8–64 atoms), served / "
                         "one by one with RemoteCalculator / in-process batched (s)",
                         f"{row['served_s']} / {row['sequential_remote_s']} / {row['in_process_batched_s']} "
                         f"({row['speedup_served_over_sequential']}x one by one)", ""))
            served = row["served_batches"]
            rows.append((f"batches the model saw, served {name}",
                         f"{served['batches']}, {served.get('mean_systems')} systems ({served.get('mean_requests')} "
                         f"requests) on average, at most {served.get('max_systems')}", ""))
    corrections = results.get("corrections")
    if corrections:
        for name, ratio in corrections["ratio_to_chgnet_at_1000_atoms"].items():
            rows.append((f"{name} cost / CHGNet energy+forces, 1,000 atoms", str(ratio), "≤ 0.3"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, clients and sizes (minutes, not an hour)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the models' device, served and local")
    parser.add_argument("--num-cpus", type=int, default=2, help="torch threads per replica and per local run")
    parser.add_argument("--only", nargs="+",
                        default=["md_step", "serving", "corrections", "frontdoor", "sessions", "workflows"])
    args = parser.parse_args()

    results: dict[str, dict] = {}
    failed: dict[str, int] = {}
    for name, argv in commands(args).items():
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(argv, cwd=HERE)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed[name] = rc

    # The table covers every benchmark's latest result, so that rerunning one (--only) keeps the rest.
    for name in commands(argparse.Namespace(**{**vars(args), "only": [""]})):
        path = RESULTS / f"{name}.json"
        if path.exists() and name not in failed:
            results[name] = json.loads(path.read_text())
    rows = summary_rows(results)
    table = ["| measured | value | goal |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    (RESULTS / "summary.md").write_text(f"Machine: {machine()}\n\n" + "\n".join(table) + "\n")
    (RESULTS / "summary.json").write_text(json.dumps(
        {"machine": machine(), "rows": [dict(zip(("what", "value", "goal"), r)) for r in rows],
         "failed": failed}, indent=2))
    print("\n".join(table))
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()

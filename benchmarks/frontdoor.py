"""The front door's cost: serving overhead per unary Compute (served minus the same backend
in-process), sequential, one client, for 2-atom and 64-atom Si with energy, forces and stress; the
same with TLS and a token; a bare grpcio echo on this machine as the floor; the 16-client throughput
of 8–16-atom systems against the in-process ceiling; and "before": the same measurements against
the Serve gRPC proxy of an earlier commit (``--before REV``, run from a git worktree of it), in the
same run, one server at a time.

    python benchmarks/frontdoor.py [--calls 200] [--before df8080d] [--num-cpus 2] [--seconds 20]

Writes results/frontdoor.json and results/frontdoor.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from bench_common import RESULTS, ROOT, machine, write_result

from mlipserve.localcluster import terminate

MODEL = "chgnet-0.3.0"
TOKEN = "benchmark-token-0123456789"


def si2() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.02, seed=1)
    return atoms


def si64() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(0.02, seed=2)
    return atoms


def mixed_8_16(n: int) -> list[Atoms]:
    templates = [lambda: bulk("Si", "diamond", a=5.43, cubic=True),
                 lambda: bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 1),
                 lambda: bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 1, 1),
                 lambda: bulk("Al", "fcc", a=4.05, cubic=True) * (1, 1, 2) * (2, 1, 1)]
    out = []
    for k in range(n):
        atoms = templates[k % len(templates)]()
        atoms.rattle(0.03, seed=100 + k)
        out.append(atoms)
    return out


EFS = ("energy", "forces", "stress")


# --- measurements --------------------------------------------------------------------------------


def per_call_ms(call, n: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class InProcess:
    """The backend alone, in this process: what serving adds is measured against it, call by call."""

    def __init__(self, threads: int) -> None:
        import torch

        from mlipserve.backends.chgnet import CHGNetBackend
        from mlipserve_client.types import Property

        torch.set_num_threads(threads)
        self.backend = CHGNetBackend(version="0.3.0", device="cpu")
        self.properties = frozenset(Property(p) for p in EFS)

    def compute(self, atoms: Atoms) -> None:
        from mlipserve.backends.base import Batch
        from mlipserve_client.convert import system_from_atoms

        self.backend.compute(Batch((system_from_atoms(atoms),), self.properties))

    def ceiling_atoms_per_s(self, systems: list[Atoms]) -> float:
        """The best this backend does on ``systems``: one by one or all merged in one pass."""
        from mlipserve.backends.base import Batch
        from mlipserve_client.convert import system_from_atoms

        typed = [system_from_atoms(a) for a in systems]
        one, merged = [], []
        for _ in range(5):
            start = time.perf_counter()
            for s in typed:
                self.backend.compute(Batch((s,), self.properties))
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            self.backend.compute(Batch(tuple(typed), self.properties))
            merged.append(time.perf_counter() - start)
        return sum(s.n_atoms for s in typed) / min(statistics.median(one), statistics.median(merged))


def served(address: str, local: InProcess, calls: int, seconds: float, **client_options) -> dict:
    """Served and in-process calls alternating, so that both see the same machine (it is shared and
    its speed drifts): the overhead is the median of the paired differences."""
    from mlipserve_client import MLIPClient

    out = {}
    with MLIPClient(address, model=MODEL, timeout=120, **client_options) as client:
        for name, atoms in (("si2", si2()), ("si64", si64())):
            pairs = []
            for k in range(calls + 10):
                start = time.perf_counter()
                local.compute(atoms)
                middle = time.perf_counter()
                client.compute(atoms, EFS)
                if k >= 10:
                    pairs.append((middle - start, time.perf_counter() - middle))
            out[f"{name}_local_ms"] = statistics.median(p[0] for p in pairs) * 1e3
            out[f"{name}_ms"] = statistics.median(p[1] for p in pairs) * 1e3
            out[f"overhead_{name}_ms"] = statistics.median(p[1] - p[0] for p in pairs) * 1e3
    out["clients_16_atoms_per_s"] = throughput(address, seconds, **client_options)
    out["ceiling_16_atoms_per_s"] = local.ceiling_atoms_per_s(mixed_8_16(16))
    out["ratio_16_clients_over_ceiling"] = out["clients_16_atoms_per_s"] / out["ceiling_16_atoms_per_s"]
    return out


def throughput(address: str, seconds: float, **client_options) -> float:
    """16 clients, each computing its own 8–16-atom system (E, F, S in one call) in a loop."""
    from mlipserve_client import MLIPClient

    @contextmanager
    def unary(atoms: Atoms):
        with MLIPClient(address, model=MODEL, timeout=300, **client_options) as own:
            yield lambda: own.compute(atoms, EFS)

    return concurrent_atoms_per_s(mixed_8_16(16), unary, seconds)


def concurrent_atoms_per_s(systems: list[Atoms], open_client, seconds: float) -> float:
    """Each system in a thread of its own, evaluated in a loop by ``open_client(atoms)`` (a context
    manager giving a callable that evaluates it once), for ``seconds``: atoms evaluated per second."""
    done = [0] * len(systems)
    barrier = threading.Barrier(len(systems) + 1)
    stop = threading.Event()

    def client(k: int) -> None:
        with open_client(systems[k]) as evaluate:
            evaluate()
            barrier.wait()
            while not stop.is_set():
                evaluate()
                done[k] += len(systems[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(systems))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def echo_floor_ms(calls: int) -> float:
    """A bare grpc.aio server in another process answering raw bytes: the transport alone."""
    from mlipserve.runtime import free_port

    port = free_port()
    code = ("import asyncio, grpc\n"
            "async def main():\n"
            "    async def echo(request, context): return request\n"
            "    server = grpc.aio.server()\n"
            "    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler('echo.Echo', "
            "{'Echo': grpc.unary_unary_rpc_method_handler(echo)})])\n"
            f"    server.add_insecure_port('127.0.0.1:{port}')\n"
            "    await server.start(); await server.wait_for_termination()\n"
            "asyncio.run(main())\n")
    import grpc

    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            echo = channel.unary_unary("/echo.Echo/Echo")
            return per_call_ms(lambda: echo(b"x" * 64, timeout=10), calls)
    finally:
        proc.terminate()
        proc.wait()


# --- servers -------------------------------------------------------------------------------------


@contextmanager
def cli_server(argv: list[str], port: int, pythonpath: str | None = None, ready: str = "serving gRPC at"):
    """``mlipserve serve`` in its own process (its own local Ray), until it prints ``ready``."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mlipserve.cli", "serve", "--port", str(port), *argv],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        try:
            deadline = time.monotonic() + 300
            while ready not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()[-3000:])
                time.sleep(0.5)
            yield f"localhost:{port}"
        finally:
            terminate(proc)


@contextmanager
def worktree(rev: str):
    """A checkout of ``rev`` beside this one, whose service/ and client/ go first on PYTHONPATH."""
    path = Path(tempfile.mkdtemp(prefix="mlipserve-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    try:
        yield f"{path / 'service'}{os.pathsep}{path / 'client'}"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def tls_material(directory: Path) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tls_certificates import make_material

    material = make_material(directory)
    return material.server.cert, material.server.key, material.ca


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each 16-client run")
    parser.add_argument("--before", default="df8080d", help="the commit whose Serve gRPC proxy is 'before'")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    from mlipserve.runtime import free_port

    cpus = ["--num-cpus", str(args.num_cpus)]
    report = {"benchmark": "frontdoor", "model": MODEL, "machine": machine(), "torch_threads": args.num_cpus,
              "calls": args.calls}
    report["echo_floor_ms"] = echo_floor_ms(args.calls)
    print(f"echo floor {report['echo_floor_ms']:.3f} ms", flush=True)
    local = InProcess(args.num_cpus)
    if args.before:
        with worktree(args.before) as path, cli_server(cpus, free_port(), pythonpath=path) as address:
            report["before_proxy"] = served(address, local, args.calls, args.seconds)
        print("before (Serve gRPC proxy)", report["before_proxy"], flush=True)
    with cli_server(cpus, free_port()) as address:
        report["front_door"] = served(address, local, args.calls, args.seconds)
    print("front door", report["front_door"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca = tls_material(Path(tmp))
        tokens = Path(tmp) / "tokens.txt"
        tokens.write_text(TOKEN + "\n")
        secure = [*cpus, "--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(tokens)]
        with cli_server(secure, free_port()) as address:
            report["front_door_tls_token"] = served(address, local, args.calls, args.seconds, tls=ca, token=TOKEN)
    print("front door, TLS + token", report["front_door_tls_token"], flush=True)
    report["tls_token_minus_plaintext_ms"] = {
        n: report["front_door_tls_token"][f"overhead_{n}_ms"] - report["front_door"][f"overhead_{n}_ms"]
        for n in ("si2", "si64")}
    path = write_result("frontdoor", report)
    _plot(report)
    print(f"wrote {path}")


def _plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in ("before_proxy", "front_door", "front_door_tls_token") if v in report]
    labels = {"before_proxy": "Serve gRPC proxy\n(before)", "front_door": "front door\nplaintext",
              "front_door_tls_token": "front door\nTLS + token"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(variants))
    for offset, name in ((-0.2, "si2"), (0.2, "si64")):
        ax.bar(x + offset, [report[v][f"overhead_{name}_ms"] for v in variants], 0.4,
               label={"si2": "2-atom Si", "si64": "64-atom Si"}[name])
    ax.axhline(report["echo_floor_ms"], color="k", ls="--", label="bare grpcio echo")
    ax.axhline(2.0, color="r", ls=":", label="goal (2 ms)")
    ax.set_xticks(x, [labels[v] for v in variants])
    ax.set_ylabel("serving overhead per Compute (ms)")
    ax.set_title("served minus the same backend in-process")
    ax.legend(fontsize=8)
    bx.bar(x, [report[v]["ratio_16_clients_over_ceiling"] for v in variants])
    bx.axhline(0.9, color="r", ls=":", label="goal (0.9)")
    bx.set_xticks(x, [labels[v] for v in variants])
    bx.set_ylabel("16-client throughput / in-process ceiling")
    bx.set_title("8–16-atom systems, E+F+S in one call")
    bx.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "frontdoor.png", dpi=120)


if __name__ == "__main__":
    main()

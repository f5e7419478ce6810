"""A real multi-node Ray cluster on one machine, for tests and benchmarks of what happens across
nodes: ``ray start`` once for the head and once per worker, each worker on a loopback address of
its own (127.0.0.2, ...), so that every node's front door has an address of its own.

Never ``ray stop`` (it would stop every Ray on the machine): a cluster's processes are found by its
GCS port in their command lines, and a node's by its address.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def processes_of(*markers: str) -> list[int]:
    """Processes whose whole command line holds every marker (``ps`` truncates Ray's long ones)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = command_line(int(entry.name))
            if line and all(m in line for m in markers):
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids`` (Ray workers rename themselves, so only parentage finds them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The field after the parenthesised name; the name itself may hold spaces.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], list(pids)
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    gcs_port: int
    cpus_per_node: int = 2
    workers: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **ENVIRONMENT}

    def _start(self, *args: str) -> None:
        subprocess.run([*RAY, "start", "--num-cpus", str(self.cpus_per_node), "--object-store-memory",
                        str(200 * 2**20), "--disable-usage-stats", *args],
                       check=True, env=self.env, capture_output=True, timeout=180)

    def add_worker(self, ip: str) -> None:
        self._start("--address", self.address, "--node-ip-address", ip)
        if ip not in self.workers:
            self.workers.append(ip)

    def kill_worker(self, ip: str) -> list[int]:
        """SIGKILL the worker node's raylet and every process it started, at once: a machine gone.

        Killing the raylet alone leaves its workers (model replicas with their front doors) serving
        until they notice, a second or more later on a loaded machine; a lost machine does not.
        """
        raylets = processes_of("raylet/raylet", f"--node_ip_address={ip}", f":{self.gcs_port}")
        _kill(raylets + descendants(raylets))
        return raylets

    def head_ip(self) -> str:
        """The head node's address as Ray knows it (where its replicas' front doors listen)."""
        code = (f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                f"print([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'] and "
                f"n['NodeManagerAddress'] not in {self.workers!r}][0])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        # Every process of this cluster names its GCS port; the nodes' workers die with their raylets.
        _kill(processes_of(f":{self.gcs_port}") + processes_of(f"--gcs_server_port={self.gcs_port}"))
        # `ray start` left the head's address where a later plain ray.init() would try to join it.
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{self.gcs_port}"):
            current.unlink()


@contextmanager
def local_cluster(workers: tuple[str, ...] = ("127.0.0.2",), cpus_per_node: int = 2) -> Iterator[LocalCluster]:
    from mlipserve.runtime import free_port

    cluster = LocalCluster(free_port(), cpus_per_node)
    cluster._start("--head", "--port", str(cluster.gcs_port), "--include-dashboard", "false")
    try:
        for ip in workers:
            cluster.add_worker(ip)
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def serving(cluster: LocalCluster, config_path: Path, port: int, log: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """``mlipserve serve --address`` deploying ``config_path`` onto ``cluster``, until stopped (SIGTERM)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlipserve.cli", "serve", "--address", cluster.address,
                                 "--config", str(config_path), "--port", str(port), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=cluster.env, cwd=log.parent)
    try:
        yield proc
    finally:
        terminate(proc)


def terminate(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

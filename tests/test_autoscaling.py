"""A family configured with min_replicas 1, max_replicas 2 scales up under a burst of requests and
back down when idle, on the requests its replicas hold (mlipserve.autoscaling: Serve's own count of
ongoing requests sees none of the front door's calls)."""

from __future__ import annotations

import threading
import time

import pytest
from ase import Atoms
from frontdoor_harness import MACE_LOAD_WARNING, TINY_OPTIONS

from mlipserve_client import MLIPClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]

APP = "autoscale"


def _replicas() -> int:
    from ray import serve

    from mlipserve.deployments.model import deployment_name

    status = serve.status().applications[APP].deployments[deployment_name("mace")]
    return status.replica_states.get("RUNNING", 0)


def test_scales_up_under_a_burst_and_down_when_idle(server):
    from ray import serve

    from mlipserve import runtime
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig

    port = runtime.free_port()
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "metrics_interval_s": 0.5,
                   "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 4}
    config = ServiceConfig(
        models=(ModelConfig(id="tiny", backend="mace", options=TINY_OPTIONS, batching=BatchingConfig(budget=0)),),
        deployments={"mace": DeploymentConfig(num_cpus=0.25, autoscaling=autoscaling)},
        # Short-lived connections, so that clients spread over the replica that was added.
        server=ServerConfig(port=port, max_connection_age_s=2.0))
    runtime.deploy(config, name=APP)
    timeline: list[tuple[float, int]] = []
    start = time.monotonic()
    stop = threading.Event()
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    failures: list[str] = []

    def client() -> None:
        with MLIPClient(f"127.0.0.1:{port}", model="tiny", timeout=120) as own:
            while not stop.is_set():
                try:
                    own.compute(water)
                except Exception as error:  # noqa: BLE001 - asserted below
                    failures.append(repr(error))

    def watch(until: float, want: int) -> bool:
        while time.monotonic() - start < until:
            timeline.append((round(time.monotonic() - start, 1), _replicas()))
            if timeline[-1][1] == want:
                return True
            time.sleep(0.5)
        return False

    try:
        assert _replicas() == 1
        threads = [threading.Thread(target=client) for _ in range(12)]
        for thread in threads:
            thread.start()
        scaled_up = watch(90, 2)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        burst_end = round(time.monotonic() - start, 1)
        scaled_down = watch(burst_end + 90, 1)
    finally:
        stop.set()
        serve.delete(APP)
    print(f"\nautoscaling timeline (s, running replicas): {timeline}; burst ended at {burst_end} s")
    assert scaled_up and scaled_down and not failures

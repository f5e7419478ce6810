"""A model upgraded in place while 8 clients call it: no request fails, every response names the
version that computed it, and each client sees the switch once (old answers, then new ones).

Its own application on the session's Ray: the tiny MACE model with two replicas, redeployed with a
new version label and a new checkpoint format (float32 instead of float64). Serve replaces one
replica at a time; the draining one finishes what it holds and refuses the rest, which the client
retries on the other (UNAVAILABLE)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ase import Atoms
from frontdoor_harness import MACE_LOAD_WARNING, TINY_OPTIONS

from mlipserve_client import MLIPClient

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]

APP = "upgrade"


def water() -> Atoms:
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def _config(port: int, version: str, dtype: str):
    from mlipserve.config import BatchingConfig, DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig

    return ServiceConfig(
        models=(ModelConfig(id="tiny", backend="mace", version=version, options={**TINY_OPTIONS, "dtype": dtype},
                            batching=BatchingConfig(budget=0)),),
        deployments={"mace": DeploymentConfig(num_replicas=2, num_cpus=0.25)},
        server=ServerConfig(port=port, drain_grace_s=5.0))


def test_upgrade_in_place_under_load_loses_no_request(server):
    from ray import serve

    from mlipserve import runtime

    port = runtime.free_port()
    runtime.deploy(_config(port, "1", "float64"), name=APP)
    address = f"127.0.0.1:{port}"
    seen: list[list[str]] = [[] for _ in range(8)]
    failures: list[str] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with MLIPClient(address, model="tiny", timeout=120) as own:
            while not stop.is_set():
                try:
                    (result,) = own.compute(water())
                except Exception as error:  # noqa: BLE001 - counted: a failed request
                    failures.append(repr(error))
                    continue
                assert np.isfinite(result.energy)
                seen[k].append(result.model_version)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    try:
        for thread in threads:
            thread.start()
        while min(len(s) for s in seen) < 5:
            time.sleep(0.05)
        runtime.deploy(_config(port, "2", "float32"), name=APP)  # returns when the new replicas serve
        time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        stop.set()
        serve.delete(APP)
    answered = sum(len(s) for s in seen)
    print(f"\nupgrade: {answered} answered, {len(failures)} failed; per client v1 -> v2 answers: "
          f"{[(s.count('1'), s.count('2')) for s in seen]}")
    assert not failures
    for versions in seen:
        assert versions[0] == "1" and versions[-1] == "2"
        switch = versions.index("2")
        assert set(versions[switch:]) == {"2"}  # never back to the old version

"""Request metrics (issue 14).

In-process, without Ray: a recording RequestObserver on a FrontDoor over the tiny MACE host sees
every call with its RPC, model and status, bounded labels, auth failures by reason, and sessions
opened and closed. Served: the session server's metrics, scraped from this node's Ray metrics
endpoint before and after a short load, moved with the right labels and stayed bounded.
"""

from __future__ import annotations

import collections
import time
import urllib.request

import grpc
import numpy as np
import pytest
from ase import Atoms
from conftest import CHGNET_ID
from frontdoor_harness import MACE_LOAD_WARNING, TINY_IDS, loop_with_tiny_host, running_front_door

from mlipserve.config import ServerConfig
from mlipserve.physics.corrected import CorrectedEvaluator
from mlipserve.runtime import APP_NAME
from mlipserve.server.auth import hash_token
from mlipserve.server.observer import NO_MODEL, UNKNOWN_MODEL, Exchange
from mlipserve_client import MLIPClient, convert
from mlipserve_client.errors import ServiceError
from mlipserve_client.types import Result
from mlipserve_client.v1 import service_pb2

pytestmark = pytest.mark.filterwarnings(MACE_LOAD_WARNING)

MODEL, OTHER_MODEL = TINY_IDS
BOGUS_MODEL = "m" * 10_000
COMPUTE = "/mlipserve.v1.MLIPService/Compute"
STATUS_NAMES = {code.name for code in grpc.StatusCode}
# Every method of the service may show up: earlier tests on the same Ray ran workflows, too.
RPC_NAMES = {method.name for method in service_pb2.DESCRIPTOR.services_by_name["MLIPService"].methods}


def water(periodic: bool = False) -> Atoms:
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.center(vacuum=4.0)
    atoms.pbc = periodic
    return atoms


class Recorder:
    """A RequestObserver that keeps what it hears (from the front door's loop thread)."""

    def __init__(self) -> None:
        self.started: collections.Counter[str] = collections.Counter()
        self.finished: list[tuple[str, str, str]] = []
        self.exchanges: list[Exchange] = []
        self.open_sessions: collections.Counter[str] = collections.Counter()
        self.auth: list[str] = []

    def call_started(self, rpc: str) -> None:
        self.started[rpc] += 1

    def call_finished(self, rpc: str, model: str, code: str) -> None:
        self.finished.append((rpc, model, code))

    def exchanged(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    def session_opened(self, model: str) -> None:
        self.open_sessions[model] += 1

    def session_closed(self, model: str) -> None:
        self.open_sessions[model] -= 1

    def auth_failed(self, reason: str) -> None:
        self.auth.append(reason)

    def in_flight(self, rpc: str) -> int:
        return self.started[rpc] - sum(1 for r, _, _ in self.finished if r == rpc)

    def wait_finished(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.finished) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.finished) >= n, self.finished


@pytest.fixture(scope="module")
def served():
    with loop_with_tiny_host() as (loop, host):
        yield loop, host


@pytest.fixture(scope="module")
def loop(served):
    return served[0]


@pytest.fixture(scope="module")
def host(served):
    return served[1]


def _fails(address: str, model: str, atoms: Atoms | None = None, **options) -> grpc.StatusCode:
    with MLIPClient(address, model=model, timeout=10, retries=False, **options) as client:
        with pytest.raises(ServiceError) as failed:
            client.compute(atoms or water())
    return failed.value.code


def test_calls_are_observed_by_rpc_model_and_code_with_bounded_labels(loop, host):
    recorder = Recorder()
    with running_front_door(loop, host, observer=recorder) as door:
        with MLIPClient(door.address, model=MODEL, timeout=10, retries=False) as client:
            for _ in range(3):
                client.compute(water())
            client.compute(water(), model=OTHER_MODEL)
            client.list_models()
            client.get_model(MODEL)
        # Silicon: not an element of the tiny model; then ids that are not configured.
        assert _fails(door.address, MODEL, Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]])) \
            is grpc.StatusCode.INVALID_ARGUMENT
        assert _fails(door.address, BOGUS_MODEL) is grpc.StatusCode.INVALID_ARGUMENT
        assert _fails(door.address, "no-such-model") is grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(door.address) as channel, pytest.raises(grpc.RpcError) as garbage:
            channel.unary_unary(COMPUTE)(b"\xff\xff\xff", timeout=10)
        assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    assert collections.Counter(recorder.finished) == {
        ("Compute", MODEL, "OK"): 3, ("Compute", OTHER_MODEL, "OK"): 1, ("ListModels", NO_MODEL, "OK"): 1,
        ("GetModel", MODEL, "OK"): 1, ("Compute", MODEL, "INVALID_ARGUMENT"): 1,
        ("Compute", UNKNOWN_MODEL, "INVALID_ARGUMENT"): 2, ("Compute", UNKNOWN_MODEL, "NOT_FOUND"): 1}
    assert all(recorder.in_flight(rpc) == 0 for rpc in recorder.started)
    assert recorder.auth == [] and not recorder.open_sessions

    # One exchange per unary call, in the same order: sizes and times of each.
    assert [(e.rpc, e.model) for e in recorder.exchanges] == [(r, m) for r, m, _ in recorder.finished]
    request = convert.compute_request_to_proto(convert.ComputeRequest(MODEL, (convert.system_from_atoms(water()),)))
    first = recorder.exchanges[0]
    assert first.bytes_in == len(request.SerializeToString()) and first.bytes_out > 0
    for exchange, (_, _, code) in zip(recorder.exchanges, recorder.finished, strict=True):
        assert 0 <= exchange.serialization_s <= exchange.seconds < 10
        assert (exchange.bytes_out > 0) == (code == "OK") and not exchange.step
    bogus = [e for e in recorder.exchanges if e.bytes_in > len(BOGUS_MODEL)]
    assert len(bogus) == 1 and bogus[0].model == UNKNOWN_MODEL
    # Labels: configured ids, "unknown" or none; status names; nothing of the bogus id.
    for rpc, model, code in recorder.finished:
        assert rpc in {"Compute", "ListModels", "GetModel"} and code in STATUS_NAMES
        assert model in {*TINY_IDS, UNKNOWN_MODEL, NO_MODEL}


def test_auth_failures_are_observed_by_reason(loop, host, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"""tokens:
  - name: alice
    sha256: {hash_token("alice-token-1")}
  - name: bob
    token: bob-token-2
    models: [{OTHER_MODEL}]
  - name: carol
    token: carol-token-3
    requests_per_second: 0.01
    burst: 1
""")
    recorder = Recorder()
    with running_front_door(loop, host, ServerConfig(token_file=str(tokens)), recorder) as door:
        assert _fails(door.address, MODEL) is grpc.StatusCode.UNAUTHENTICATED
        assert _fails(door.address, MODEL, token="alice-token-x") is grpc.StatusCode.UNAUTHENTICATED
        assert _fails(door.address, MODEL, token="bob-token-2") is grpc.StatusCode.PERMISSION_DENIED
        with MLIPClient(door.address, model=MODEL, timeout=10, token="carol-token-3", retries=False) as carol:
            carol.compute(water())
        assert _fails(door.address, MODEL, token="carol-token-3") is grpc.StatusCode.RESOURCE_EXHAUSTED
        with MLIPClient(door.address, model=MODEL, timeout=10, token="alice-token-1") as alice:
            alice.compute(water())

    assert recorder.auth == ["missing_token", "invalid_token", "model_not_allowed", "rate_limited"]
    assert recorder.finished == [
        ("Compute", UNKNOWN_MODEL, "UNAUTHENTICATED"), ("Compute", UNKNOWN_MODEL, "UNAUTHENTICATED"),
        ("Compute", MODEL, "PERMISSION_DENIED"), ("Compute", MODEL, "OK"),
        ("Compute", UNKNOWN_MODEL, "RESOURCE_EXHAUSTED"), ("Compute", MODEL, "OK")]
    assert recorder.in_flight("Compute") == 0


def test_sessions_are_observed_open_and_closed_with_their_steps(loop, host):
    recorder = Recorder()
    atoms = water(periodic=True)
    with running_front_door(loop, host, observer=recorder) as door:
        with MLIPClient(door.address, model=MODEL, timeout=10, retries=False) as client:
            session = client.session(atoms)
            for k in range(3):
                session.step(atoms.positions + 0.01 * k)
            assert recorder.open_sessions == {MODEL: 1} and recorder.in_flight("Simulate") == 1
            session.close()
            recorder.wait_finished(1)
            with pytest.raises(ServiceError) as unknown:
                client.session(atoms, model="no-such-model")
            assert unknown.value.code is grpc.StatusCode.NOT_FOUND
            recorder.wait_finished(2)

    assert recorder.open_sessions == {MODEL: 0} and recorder.in_flight("Simulate") == 0
    (closed, model, code), refused = recorder.finished
    # The client ends a session by cancelling its stream.
    assert (closed, model) == ("Simulate", MODEL) and code in {"OK", "CANCELLED"}
    assert refused == ("Simulate", UNKNOWN_MODEL, "NOT_FOUND")
    opening, *steps, failed_open = recorder.exchanges
    assert not opening.step and opening.bytes_out > 0
    assert [s.step for s in steps] == [True] * 3 and all(s.bytes_in > 0 and s.bytes_out > 0 for s in steps)
    assert all(0 <= s.serialization_s <= s.seconds for s in steps)
    assert (failed_open.rpc, failed_open.model, failed_open.bytes_out) == ("Simulate", UNKNOWN_MODEL, 0)


def test_corrected_evaluator_reports_model_and_corrections_times():
    heard = []

    class Heard:
        def evaluated(self, model_s: float, corrections_s: float | None) -> None:
            heard.append((model_s, corrections_s))

    from mlipserve.backends.base import Batch
    from mlipserve_client.types import ModelInfo

    evaluate = CorrectedEvaluator(lambda batch: [Result(energy=0.0) for _ in batch.systems],
                                  ModelInfo(id="m", architecture="fake"), "cpu", Heard())
    evaluate(Batch((convert.system_from_atoms(water()),), frozenset(), ""))
    ((model_s, corrections_s),) = heard
    assert model_s >= 0 and corrections_s is None


# --- served: the session server's metrics on this node's Ray metrics endpoint -------------------


def _endpoints() -> list[str]:
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def _scrape(endpoints: list[str]) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for url in endpoints:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name.startswith("ray_mlipserve_"):
                samples += [(s.name, s.labels, s.value) for s in family.samples]
    return samples


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def _moved(before, after, name: str, **labels: str) -> float:
    return _total(after, name, **labels) - _total(before, name, **labels)


def _poll(endpoints, condition, timeout: float = 40.0):
    """Scrapes until ``condition(samples)`` holds: Ray reports a worker's metrics every ~10 s."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(endpoints)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_served_request_metrics_move_with_bounded_labels(server):
    endpoints = _endpoints()
    before = _scrape(endpoints)
    molecule = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                       [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    n_calls, n_steps = 30, 5
    with MLIPClient(server.address, model="mace-tiny", timeout=60) as client:
        configured = {m.id for m in client.list_models()}
        for _ in range(n_calls):
            client.compute(molecule)
        silicon = Atoms("Si2", positions=[[0, 0, 0], [1.36, 1.36, 1.36]], cell=[[0, 2.7, 2.7], [2.7, 0, 2.7],
                                                                              [2.7, 2.7, 0]], pbc=True)
        client.compute(silicon, model=f"{CHGNET_ID}+d3")  # a composite model: its corrections' time
        for model, code in [(BOGUS_MODEL, grpc.StatusCode.INVALID_ARGUMENT), ("no-such-model", grpc.StatusCode.NOT_FOUND),
                            ("mace-tiny", grpc.StatusCode.INVALID_ARGUMENT)]:  # mace-tiny: no Si
            with pytest.raises(ServiceError) as failed:
                client.compute(silicon, model=model)
            assert failed.value.code is code
        boxed = molecule.copy()
        boxed.set_cell([8, 8, 8])
        boxed.pbc = True
        session = client.session(boxed)
        rng = np.random.default_rng(1)
        for _ in range(n_steps):
            session.step(boxed.positions + rng.normal(0, 0.01, boxed.positions.shape))
        # While it is open: the session and its stream show in the gauges.
        during = _poll(endpoints, lambda s: _total(s, "ray_mlipserve_sessions_open", model="mace-tiny") >= 1
                       and _total(s, "ray_mlipserve_requests_in_flight", rpc="Simulate") >= 1)
        session.close()
    assert _total(during, "ray_mlipserve_sessions_open", model="mace-tiny") >= 1
    assert _total(during, "ray_mlipserve_requests_in_flight", rpc="Simulate") >= 1

    def requests(samples, model: str, code: str, rpc: str = "Compute") -> float:
        return _moved(before, samples, "ray_mlipserve_requests_total", rpc=rpc, model=model, code=code)

    def settled(samples) -> bool:
        return (requests(samples, "mace-tiny", "OK") >= n_calls
                and requests(samples, UNKNOWN_MODEL, "NOT_FOUND") >= 1
                and _total(samples, "ray_mlipserve_sessions_open", model="mace-tiny") == 0
                and _moved(before, samples, "ray_mlipserve_session_steps_total", model="mace-tiny") >= n_steps
                and _moved(before, samples, "ray_mlipserve_corrections_seconds_count", model=f"{CHGNET_ID}+d3") >= 1)

    after = _poll(endpoints, settled)
    assert requests(after, "mace-tiny", "OK") >= n_calls
    assert requests(after, UNKNOWN_MODEL, "INVALID_ARGUMENT") >= 1  # the 10 kB id
    assert requests(after, UNKNOWN_MODEL, "NOT_FOUND") >= 1
    assert requests(after, "mace-tiny", "INVALID_ARGUMENT") >= 1
    assert requests(after, f"{CHGNET_ID}+d3", "OK") >= 1
    assert requests(after, NO_MODEL, "OK", rpc="ListModels") >= 1
    simulated = sum(requests(after, "mace-tiny", code, rpc="Simulate") for code in ("OK", "CANCELLED"))
    assert simulated >= 1
    assert _moved(before, after, "ray_mlipserve_session_steps_total", model="mace-tiny") >= n_steps
    assert _total(after, "ray_mlipserve_sessions_open", model="mace-tiny") == 0
    # Latency and its parts: per request at the front door, per forward pass in the batcher.
    for name, labels, at_least in [
            ("ray_mlipserve_request_seconds_count", {"rpc": "Compute", "model": "mace-tiny"}, n_calls),
            ("ray_mlipserve_request_seconds_count", {"rpc": "Simulate", "model": "mace-tiny"}, n_steps + 1),
            ("ray_mlipserve_serialization_seconds_count", {"rpc": "Compute", "model": "mace-tiny"}, n_calls),
            ("ray_mlipserve_queue_wait_seconds_count", {"model": "mace-tiny"}, n_calls + n_steps),
            ("ray_mlipserve_model_seconds_count", {"model": "mace-tiny"}, n_calls + n_steps),
            ("ray_mlipserve_corrections_seconds_count", {"model": f"{CHGNET_ID}+d3"}, 1),
            ("ray_mlipserve_request_bytes_total", {"rpc": "Compute", "model": "mace-tiny"}, 100 * n_calls),
            ("ray_mlipserve_response_bytes_total", {"rpc": "Compute", "model": "mace-tiny"}, 100 * n_calls),
            ("ray_mlipserve_request_bytes_total", {"rpc": "Compute", "model": UNKNOWN_MODEL}, len(BOGUS_MODEL))]:
        assert _moved(before, after, name, **labels) >= at_least, (name, labels)
    assert _moved(before, after, "ray_mlipserve_request_seconds_bucket", rpc="Compute", model="mace-tiny",
                  le="+Inf") >= n_calls

    # Bounded labels on every mlipserve series: configured ids, "unknown" or none; names, not ids.
    assert {"mace-tiny", f"{CHGNET_ID}+d3"} <= configured
    values = collections.defaultdict(set)
    for _, labels, _ in after:
        if labels.get("application", APP_NAME) != APP_NAME:
            continue  # other tests' applications on the same Ray, with models of their own
        for key, value in labels.items():
            values[key].add(value)
            assert len(value) <= 256, (key, value[:80])
    assert values["model"] <= configured | {UNKNOWN_MODEL, NO_MODEL}
    assert values["code"] <= STATUS_NAMES and values["rpc"] <= RPC_NAMES
    assert values["reason"] <= {"missing_token", "invalid_token", "rate_limited", "model_not_allowed"}
    assert not {"session", "session_id", "request_id", "peer"} & set(values)


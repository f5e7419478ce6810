"""MD sessions (Simulate) at the front door, in-process with the tiny MACE model (float64): the same
numbers as unary calls, one round trip per geometry, shared batches, and a clear status for every
kind of bad stream input."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet
from frontdoor_harness import MACE_LOAD_WARNING, TINY_IDS, LoopThread, running_front_door, tiny_host

from mlipserve.config import ServerConfig
from mlipserve_client import MLIPClient, RemoteCalculator, convert
from mlipserve_client.errors import ServiceError, ServiceInputError
from mlipserve_client.v1 import session_pb2, system_pb2

pytestmark = pytest.mark.filterwarnings(MACE_LOAD_WARNING)

MODEL = TINY_IDS[0]
SIMULATE = "/mlipserve.v1.MLIPService/Simulate"


def box_of_water(periodic: bool = True) -> Atoms:
    atoms = Atoms("OH2OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0],
                                       [3, 3, 3], [3.96, 3, 3], [2.76, 3.93, 3]])
    atoms.set_cell([6.5, 6.5, 6.5])
    atoms.pbc = periodic
    atoms.rattle(0.02, seed=3)
    return atoms


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def host(loop):
    # Merging forced on, waiting for company, so that concurrent steps can be seen sharing passes.
    host = tiny_host(loop, budget=1e9, max_wait_ms=50)
    yield host
    loop.run(host.aclose())


@pytest.fixture(scope="module")
def door(loop, host):
    with running_front_door(loop, host, ServerConfig(session_idle_timeout_s=1.5, max_sessions=6)) as door:
        yield door


def trajectory(atoms: Atoms, calc, steps: int) -> list[np.ndarray]:
    atoms = atoms.copy()
    atoms.set_momenta(np.random.default_rng(5).normal(0, 0.3, (len(atoms), 3)))
    atoms.calc = calc
    forces = []
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(lambda: forces.append(atoms.get_forces().copy()), interval=1)
    dyn.run(steps)
    return forces


def test_session_trajectory_equals_unary_and_in_process(door, host, loop):
    from ase.calculators.singlepoint import SinglePointCalculator  # noqa: F401 - ASE's own types only

    session = RemoteCalculator(door.address, MODEL, stream=True)
    unary = RemoteCalculator(door.address, MODEL, stream=False)
    by_session = trajectory(box_of_water(), session, 60)
    by_unary = trajectory(box_of_water(), unary, 60)
    assert session._session is not None and unary._session is None
    np.testing.assert_allclose(by_session, by_unary, atol=1e-10, rtol=0)
    # In-process, the same backend: the last geometry's forces.
    atoms = box_of_water()
    (local,) = loop.run(host.compute(convert.ComputeRequest(MODEL, (convert.system_from_atoms(atoms),))))
    (served,) = MLIPClient(door.address, model=MODEL).compute(atoms)
    np.testing.assert_allclose(served.forces, local.forces, atol=1e-12, rtol=0)
    assert session.round_trips == unary.round_trips == 61  # one per geometry: 60 steps and the start
    session.close()
    unary.close()


def test_forces_then_stress_is_one_round_trip(door):
    calc = RemoteCalculator(door.address, MODEL)
    atoms = box_of_water()
    atoms.calc = calc
    atoms.get_forces()
    atoms.get_stress()
    atoms.get_potential_energy()
    assert calc.round_trips == 1
    molecule = box_of_water(periodic=False)
    molecule.calc = RemoteCalculator(door.address, MODEL, stream=False)
    molecule.get_forces()
    assert "stress" not in molecule.calc.results  # no periodic cell: stress never asked
    calc.close()
    molecule.calc.close()


def test_cell_changes_travel_and_match_unary(door):
    atoms = box_of_water()
    with MLIPClient(door.address, model=MODEL) as client, client.session(atoms, ["energy", "forces", "stress"]) as s:
        for scale in (1.0, 1.01, 1.01, 0.99):
            atoms.set_cell(box_of_water().cell * scale, scale_atoms=True)
            stepped = s.step(atoms.positions, atoms.cell.array)
            (unary,) = client.compute(atoms, ["energy", "forces", "stress"])
            assert stepped.energy == pytest.approx(unary.energy, abs=1e-12)
            np.testing.assert_allclose(stepped.stress, unary.stress, atol=1e-12, rtol=0)


def test_steps_of_sessions_and_unary_calls_share_batches(door, host):
    before = len(host.batch_history(MODEL))
    errors = []

    def session_client(seed: int) -> None:
        atoms = box_of_water()
        try:
            with MLIPClient(door.address, model=MODEL) as client, client.session(atoms) as s:
                for k in range(15):
                    atoms.rattle(0.005, seed=seed * 100 + k)
                    s.step(atoms.positions)
        except Exception as error:  # noqa: BLE001 - asserted below
            errors.append(error)

    def unary_client() -> None:
        with MLIPClient(door.address, model=MODEL) as client:
            for _ in range(15):
                client.compute(box_of_water())

    threads = [threading.Thread(target=session_client, args=(k,)) for k in range(3)]
    threads.append(threading.Thread(target=unary_client))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    records = host.batch_history(MODEL)[before:]
    assert any(r.n_sessions >= 2 for r in records)  # steps of different sessions in one pass
    assert any(0 < r.n_sessions < r.n_systems for r in records)  # with a unary request


# --- bad stream input -------------------------------------------------------------------------------


def _open(atoms: Atoms | None = None) -> session_pb2.SessionRequest:
    system = convert.system_to_proto(convert.system_from_atoms(atoms or box_of_water()))
    return session_pb2.SessionRequest(open=session_pb2.SessionOpen(model=MODEL, system=system))


def _step(positions, step: int = 0) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(step=session_pb2.SessionStep(step=step, positions=list(positions)))


def _assert_soon(condition, within_s: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


GOOD = box_of_water().positions.ravel().tolist()
NAN = float("nan")
BAD_STREAMS = {
    "positions before open": ([_step(GOOD)], "INVALID_ARGUMENT", "starts with SessionOpen"),
    "wrong atom count": ([_open(), _step(GOOD[:-3])], "INVALID_ARGUMENT", "session's 6 atoms need 18"),
    "species change mid-session": ([_open(), _step(GOOD), _open(box_of_water()[:3])], "INVALID_ARGUMENT",
                                   "already open"),
    "NaN positions": ([_open(), _step(GOOD[:4] + [NAN] + GOOD[5:])], "INVALID_ARGUMENT", "step 0.positions[1]"),
    "overlapping atoms": ([_open(), _step(GOOD[:3] + GOOD[:3] + GOOD[6:])], "INVALID_ARGUMENT", "overlap"),
    "open without a system": ([session_pb2.SessionRequest(open=session_pb2.SessionOpen(model=MODEL))],
                              "INVALID_ARGUMENT", "needs its system"),
    "unknown model": ([session_pb2.SessionRequest(open=session_pb2.SessionOpen(
        model="nope", system=system_pb2.System(atomic_numbers=[1], positions=[0, 0, 0])))], "NOT_FOUND", MODEL),
    "element the model lacks": ([_open(Atoms("Si", positions=[[0, 0, 0]]))], "INVALID_ARGUMENT", "not trained on Si"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_stream_input_gets_a_clear_status(door, case):
    messages, code, words = BAD_STREAMS[case]
    with grpc.insecure_channel(door.address) as channel:
        simulate = channel.stream_stream(SIMULATE, request_serializer=session_pb2.SessionRequest.SerializeToString,
                                         response_deserializer=session_pb2.SessionResponse.FromString)
        with pytest.raises(grpc.RpcError) as error:
            list(simulate(iter(messages), timeout=30))
    assert error.value.code().name == code, error.value.details()
    assert words in error.value.details()
    _assert_soon(lambda: not door.sessions.open_sessions)  # nothing left behind (the server's cleanup follows its status)
    (good,) = MLIPClient(door.address, model=MODEL).compute(box_of_water())
    assert np.isfinite(good.energy)


def test_idle_session_is_closed_and_the_client_reopens_it(door):
    import time

    atoms = box_of_water()
    with MLIPClient(door.address, model=MODEL) as client, client.session(atoms) as s:
        first = s.step(atoms.positions)
        time.sleep(2.5)  # past the 1.5 s idle timeout: the server closed the stream
        _assert_soon(lambda: not door.sessions.open_sessions)
        again = s.step(atoms.positions)
        assert s.opens == 2 and again.energy == first.energy
    with grpc.insecure_channel(door.address) as channel:
        simulate = channel.stream_stream(SIMULATE, request_serializer=session_pb2.SessionRequest.SerializeToString,
                                         response_deserializer=session_pb2.SessionResponse.FromString)
        requests = iter([_open()])  # opens, then sends nothing more while keeping the stream open

        def held_open():
            yield from requests
            time.sleep(5)

        with pytest.raises(grpc.RpcError) as error:
            list(simulate(held_open(), timeout=30))
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert ("mlipserve-session", "idle") in tuple(error.value.trailing_metadata())


def test_sessions_are_limited_per_front_door(door):
    clients = [MLIPClient(door.address, model=MODEL) for _ in range(7)]
    sessions = [c.session(box_of_water()) for c in clients[:6]]
    with pytest.raises(ServiceError) as error:
        clients[6].session(box_of_water())
    assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_sessions" in error.value.details
    assert not isinstance(error.value, ServiceInputError)
    for s in sessions:
        s.close()
    for c in clients:
        c.close()


def test_drain_ends_open_sessions_at_once(loop, host):
    import time

    with running_front_door(loop, host) as door:
        client = MLIPClient(door.address, model=MODEL, timeout=2)
        session = client.session(box_of_water())
        session.step(box_of_water().positions)
        start = time.monotonic()
        loop.run(door.stop(grace=8.0))  # the open stream does not hold the drain for its grace
        assert time.monotonic() - start < 4.0
        with pytest.raises(ServiceError) as error:
            session.step(box_of_water().positions)  # nothing listens any more: retried, then refused
        assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        session.close()
        client.close()

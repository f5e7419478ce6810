"""Every byte gets a status: a table of bad requests, sent as raw bytes and as messages to the
session server (Ray Serve, the front door in the model replicas), each with its expected status and
words, and the server answering the next good request."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import CHGNET_ID, si_diamond

from mlipserve_client import convert
from mlipserve_client.v1 import compute_pb2

pytestmark = pytest.mark.integration

NAN, INF = float("nan"), float("inf")
COMPUTE = "/mlipserve.v1.MLIPService/Compute"


def _si():
    return convert.system_to_proto(convert.system_from_atoms(si_diamond()))


def _system(**changes):
    message = _si()
    for name, value in changes.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(message, name, value)
        else:
            field = getattr(message, name)
            del field[:]
            field.extend(value)
    return message


def _request(systems=None, **fields) -> bytes:
    request = compute_pb2.ComputeRequest(model=CHGNET_ID, systems=[_si()] if systems is None else systems)
    for name, value in fields.items():
        if isinstance(value, str):
            setattr(request, name, value)
        else:
            getattr(request, name).extend(value)
    return request.SerializeToString()


def _overlapping(atom, onto):
    positions = si_diamond().positions
    positions[atom] = positions[onto] + [0.01, 0, 0]
    return positions.ravel().tolist()


def _random_box(n: int, side: float, seed: int = 0):
    positions = np.random.default_rng(seed).uniform(0, side, (n, 3))
    return compute_pb2.ComputeRequest(model=CHGNET_ID, systems=[_system(
        atomic_numbers=[14] * n, positions=positions.ravel().tolist(),
        cell=[side, 0, 0, 0, side, 0, 0, 0, side])]).SerializeToString()


def _many_systems(n: int) -> bytes:
    two = _system(atomic_numbers=[14, 14], positions=[0, 0, 0, 1.36, 1.36, 1.36],
                  cell=[0, 2.72, 2.72, 2.72, 0, 2.72, 2.72, 2.72, 0])
    return _request(systems=[two] * n)


def _electrostatics(**fields):
    return [compute_pb2.Correction(electrostatics=compute_pb2.Electrostatics(**fields))]


def _unknown_enum_correction() -> bytes:
    request = compute_pb2.ComputeRequest.FromString(_request(corrections=_electrostatics()))
    request.corrections[0].electrostatics.method = 9  # proto3 enums are open: 9 travels, and must be refused
    return request.SerializeToString()


_VALID = _request()
# Each case: bytes sent (or what makes them: the large ones are built only when their test runs),
# expected status, words the message must contain, and the call's timeout.
CASES = {
    # --- bytes that are not a request ---
    "garbage bytes": (b"\xff\xfe\xfd\xfc\xfb" * 7, "INVALID_ARGUMENT", "not a valid mlipserve.v1.ComputeRequest"),
    "truncated message": (_VALID[:-11], "INVALID_ARGUMENT", "truncated, or not protobuf"),
    "invalid UTF-8 model id": (b"\x0a\x03\xff\xfe\xfd", "INVALID_ARGUMENT", "not a valid"),
    "length past the end": (b"\x12\xff\xff\x03\x0a", "INVALID_ARGUMENT", "not a valid"),
    "empty message": (b"", "INVALID_ARGUMENT", "no model id"),
    "wrong wire type for systems": (b"\x0a\x0c" + CHGNET_ID.encode() + b"\x10\x01", "INVALID_ARGUMENT", "no systems"),
    # --- shapes ---
    "mismatched positions": (_request([_system(positions=[0.0] * 10)]), "INVALID_ARGUMENT", "systems[0].positions"),
    "cell of 4 values": (_request([_system(cell=[1.0, 2, 3, 4])]), "INVALID_ARGUMENT", "systems[0].cell"),
    "pbc of 2 values": (_request([_system(pbc=[True, True])]), "INVALID_ARGUMENT", "systems[0].pbc"),
    "charges of the wrong length": (_request([_system(atomic_charges=[0.0] * 3)]), "INVALID_ARGUMENT",
                                    "systems[0].atomic_charges"),
    "zero atoms": (_request([_system(atomic_numbers=[], positions=[])]), "INVALID_ARGUMENT", "systems[0].atomic_numbers"),
    "no systems": (_request([]), "INVALID_ARGUMENT", "no systems"),
    # --- values ---
    "nan position": (_request([_si(), _system(positions=[0.0] * 30 + [NAN] + [0.0] * 161)]), "INVALID_ARGUMENT",
                     "systems[1].positions[10]"),
    "inf position": (_request([_system(positions=[INF] + [0.0] * 191)]), "INVALID_ARGUMENT", "systems[0].positions[0]"),
    "inf cell": (_request([_system(cell=[INF] + [0.0] * 8)]), "INVALID_ARGUMENT", "systems[0].cell"),
    "1e30 coordinates": (_request([_system(positions=[1e30] * 3 + si_diamond().positions.ravel().tolist()[3:],
                                           pbc=[False] * 3, cell=[])]), "INVALID_ARGUMENT", "beyond ±1e+06 Å"),
    "atoms 1e4 Å apart": (_request([_system(positions=[1e4] * 3 + si_diamond().positions.ravel().tolist()[3:],
                                            pbc=[False] * 3, cell=[])]), "INVALID_ARGUMENT", "may span at most"),
    "atomic number 0": (_request([_system(atomic_numbers=[14] * 12 + [0] + [14] * 51)]), "INVALID_ARGUMENT",
                        "systems[0].atomic_numbers[12]"),
    "atomic number 119": (_request([_system(atomic_numbers=[119] * 64)]), "INVALID_ARGUMENT",
                          "systems[0].atomic_numbers[0]"),
    "element the model lacks": (_request([_system(atomic_numbers=[14] * 40 + [96] + [14] * 23)]),
                                "INVALID_ARGUMENT", "not trained on Cm (atoms 40)"),
    "singular periodic cell": (_request([_system(cell=[10.86, 0, 0, 0, 10.86, 0, 0, 0, 0])]), "INVALID_ARGUMENT",
                               "singular"),
    "overlapping atoms": (_request([_system(positions=_overlapping(atom=9, onto=4))]), "INVALID_ARGUMENT",
                          "atoms 4 and 9 are 0.010 Å apart"),
    "cell in nm": (_request([_system(cell=[1.086, 0, 0, 0, 1.086, 0, 0, 0, 1.086], positions=[0.0] * 192)]),
                   "INVALID_ARGUMENT", "is the cell in Å?"),
    "absurd total charge": (_request([_system(total_charge=1e6)]), "INVALID_ARGUMENT", "systems[0].total_charge"),
    "impossible spin multiplicity": (_request([_system(spin_multiplicity=5000)]), "INVALID_ARGUMENT",
                                     "systems[0].spin_multiplicity"),
    "charges not summing to the total": (_request([_system(atomic_charges=[0.1] * 64)]), "INVALID_ARGUMENT",
                                         "sum to 6.4 e but total_charge is 0 e"),
    # --- the request's other fields ---
    "unknown model": (_request(model="mace-mp-0-medium"), "NOT_FOUND", CHGNET_ID),
    "10 kB model id": (_request(model="m" * 10_000), "INVALID_ARGUMENT", "10,000 characters long"),
    "unknown property": (_request(properties=[1, 17]), "INVALID_ARGUMENT", "properties[1]"),
    "property the model lacks": (_request(properties=[compute_pb2.PROPERTY_CHARGES]), "INVALID_ARGUMENT",
                                 "cannot compute charges"),
    "unknown task": (_request(task="omol"), "INVALID_ARGUMENT", "has no task 'omol'"),
    "unknown correction method": (_unknown_enum_correction(), "INVALID_ARGUMENT", "corrections[0].electrostatics.method"),
    "empty correction": (_request(corrections=[compute_pb2.Correction()]), "INVALID_ARGUMENT", "corrections[0]"),
    "negative exclusion radius": (_request(corrections=_electrostatics(exclusion_radius=-1.0)), "INVALID_ARGUMENT",
                                  "exclusion_radius"),
    # --- size ---
    "10^5 atoms in a small box": (lambda: _random_box(100_000, 20.0), "INVALID_ARGUMENT", "is the cell in Å?"),
    "10^6 atoms": (lambda: _random_box(1_000_000, 230.0), "RESOURCE_EXHAUSTED", "server.limits.max_atoms_per_system"),
    "3 x 80,000 atoms": (lambda: _request([compute_pb2.ComputeRequest.FromString(_random_box(80_000, 100.0)).systems[0]] * 3),
                         "RESOURCE_EXHAUSTED", "server.limits.max_atoms_per_request"),
    "thousands of systems": (lambda: _many_systems(5000), "RESOURCE_EXHAUSTED", "server.limits.max_systems_per_request"),
    "70 MiB message": (lambda: _request(task="x" * (70 * 2**20)), "RESOURCE_EXHAUSTED", "server.limits.max_message_mb"),
    "200 MiB message": (lambda: _request(task="x" * (200 * 2**20)), "RESOURCE_EXHAUSTED", "larger than max"),
    "expired deadline": (_VALID, "DEADLINE_EXCEEDED", "Deadline Exceeded", 1e-6),
}


def test_the_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(server, client, case):
    payload, code, words, *timeout = CASES[case]
    payload = payload() if callable(payload) else payload
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        compute = channel.unary_unary(COMPUTE)  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as error:
            compute(payload, timeout=timeout[0] if timeout else 120)
    assert error.value.code().name == code, error.value.details()
    assert words in error.value.details()
    assert "Traceback" not in error.value.details() and len(error.value.details()) < 400
    (good,) = client.compute(si_diamond(), ("energy",))
    assert np.isfinite(good.energy)

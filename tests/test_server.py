"""The real path: the front door in Ray Serve replicas + CHGNet, over loopback, against CHGNet's own calculator."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111
from conftest import CHGNET_ID, ethanol_boxed, ethanol_no_cell, nacl_rattled, si_diamond

from mlipserve_client import MLIPClient, convert
from mlipserve_client.errors import ServiceError, ServiceInputError
from mlipserve_client.types import ModelStatus, Property
from mlipserve_client.v1 import service_pb2_grpc

pytestmark = pytest.mark.integration

ALL = ("energy", "forces", "stress", "energies", "magmoms")
E_TOL_PER_ATOM, F_TOL, S_TOL = 1e-5, 1e-4, 1e-5


def _local(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energies(),
            atoms.get_magnetic_moments())


@pytest.mark.parametrize("make", [si_diamond, nacl_rattled, ethanol_boxed])
def test_served_equals_chgnet_calculator(client, chgnet_calc, make):
    atoms = make()
    (served,) = client.compute(atoms, ALL)
    energy, forces, stress, energies, magmoms = _local(atoms, chgnet_calc)
    assert abs(served.energy - energy) / len(atoms) < E_TOL_PER_ATOM
    np.testing.assert_allclose(served.forces, forces, atol=F_TOL, rtol=0)
    np.testing.assert_allclose(served.stress, stress, atol=S_TOL, rtol=0)
    np.testing.assert_allclose(served.energies, energies, atol=E_TOL_PER_ATOM, rtol=0)
    np.testing.assert_allclose(served.magmoms, magmoms, atol=1e-5, rtol=0)


def test_molecule_without_cell_gets_the_boxed_answer(client, chgnet_calc):
    (served,) = client.compute(ethanol_no_cell(), ALL)
    energy, forces, *_ = _local(ethanol_boxed(), chgnet_calc)
    assert abs(served.energy - energy) / 9 < E_TOL_PER_ATOM
    np.testing.assert_allclose(served.forces, forces, atol=F_TOL, rtol=0)
    assert served.stress is None


def cu_slab() -> Atoms:
    """Cu(111), periodic in x and y only, vacuum wider than CHGNet's cutoff on both sides."""
    atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    atoms.rattle(stdev=0.03, seed=3)
    return atoms


def test_slab_and_a_mixed_batch_equal_chgnet_calculator(client, chgnet_calc):
    """A slab alone, then a bulk crystal, a slab and a molecule in one request: each equals CHGNet's
    own calculator (the molecule its boxed answer, without stress)."""
    systems = [si_diamond(), cu_slab(), ethanol_no_cell()]
    references = [si_diamond(), cu_slab(), ethanol_boxed()]
    (alone,) = client.compute(cu_slab(), ALL)
    mixed = client.compute(systems, ALL)
    for served, atoms in [(alone, references[1]), *zip(mixed, references, strict=True)]:
        energy, forces, stress, energies, _ = _local(atoms, chgnet_calc)
        assert abs(served.energy - energy) / len(atoms) < E_TOL_PER_ATOM
        np.testing.assert_allclose(served.forces, forces, atol=F_TOL, rtol=0)
        np.testing.assert_allclose(served.energies, energies, atol=E_TOL_PER_ATOM, rtol=0)
        if atoms.pbc.any():
            np.testing.assert_allclose(served.stress, stress, atol=S_TOL, rtol=0)
    assert mixed[2].stress is None


def test_many_systems_in_one_call_keep_their_order(client):
    systems = [si_diamond(), ethanol_no_cell(), nacl_rattled()]
    together = client.compute(systems, ("energy", "forces"))
    for atoms, result in zip(systems, together, strict=True):
        (alone,) = client.compute(atoms, ("energy", "forces"))
        assert result.forces.shape == (len(atoms), 3)
        assert result.energy == pytest.approx(alone.energy, abs=1e-4)


def test_response_names_model_and_version(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.MLIPServiceStub(channel)
        request = convert.compute_request_to_proto(convert.ComputeRequest(
            CHGNET_ID, (convert.system_from_atoms(si_diamond()),), frozenset({Property.ENERGY})))
        response = stub.Compute(request, timeout=60)
    assert (response.model, response.model_version) == (CHGNET_ID, "0.3.0")
    assert response.results[0].HasField("energy") and not response.results[0].forces


def test_list_and_get_models(client):
    info = next(i for i in client.list_models() if i.id == CHGNET_ID)
    assert info.status is ModelStatus.AVAILABLE
    assert (info.architecture, info.version, info.cutoff, info.dtype, info.device) == ("CHGNet", "0.3.0", 6.0, "float32", "cpu")
    assert info.num_parameters == 412_525 and info.trained and "MPtrj" in info.training_data and info.license
    assert set(info.properties) == set(Property) - {Property.CHARGES} and 94 in info.elements and 95 not in info.elements
    assert client.get_model(CHGNET_ID) == info
    with pytest.raises(ServiceInputError) as error:
        client.get_model("mace-mp-0")
    assert error.value.code is grpc.StatusCode.NOT_FOUND and CHGNET_ID in error.value.details


def test_eight_client_threads_get_their_own_answers(server, client):
    structures = []
    for k in range(8):
        atoms = si_diamond() if k % 2 else nacl_rattled()
        atoms.rattle(stdev=0.02, seed=100 + k)
        structures.append(atoms)
    expected = [client.compute(a, ("energy", "forces"))[0] for a in structures]
    errors, mismatches = [], []

    def work(k):
        try:
            with MLIPClient(server.address, model=CHGNET_ID, timeout=120) as own:
                for _ in range(3):
                    (got,) = own.compute(structures[k], ("energy", "forces"))
                    if abs(got.energy - expected[k].energy) > 1e-4 or np.abs(got.forces - expected[k].forces).max() > F_TOL:
                        mismatches.append(k)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not mismatches


# --- bad input -------------------------------------------------------------------------------------


def test_bad_request_does_not_disturb_concurrent_good_ones(server, client):
    expected = client.compute(si_diamond(), ("energy",))[0].energy
    results, failures = [], []

    def good():
        results.append(client.compute(si_diamond(), ("energy",))[0].energy)

    def bad():
        bad_atoms = si_diamond()
        bad_atoms.numbers[3] = 100
        try:
            client.compute(bad_atoms)
        except ServiceInputError as error:
            failures.append(error.code)

    threads = [threading.Thread(target=good if k % 2 else bad) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == pytest.approx([expected] * 4, abs=1e-4)
    assert failures == [grpc.StatusCode.INVALID_ARGUMENT] * 4


def test_client_errors_are_ase_exceptions(client):
    from ase.calculators.calculator import CalculationFailed, InputError

    with pytest.raises(InputError):
        client.compute(si_diamond(), model="no-such-model")
    assert issubclass(ServiceInputError, CalculationFailed) and issubclass(ServiceError, CalculationFailed)


def test_deadline_is_enforced(client):
    with pytest.raises(ServiceError) as error:
        client.compute([si_diamond()] * 6, ALL, timeout=0.001)
    assert error.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


# --- discovery -----------------------------------------------------------------------------------


def test_reflection_lists_services_and_health_is_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"mlipserve.v1.MLIPService", "grpc.health.v1.Health"} <= services
        compute = database.FindFileContainingSymbol("mlipserve.v1.ComputeRequest")
        assert compute.name == "mlipserve/v1/compute.proto"
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mlipserve.v1.MLIPService", f"mlipserve.v1.MLIPService/{CHGNET_ID}"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert error.value.code() is grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_health_was_not_serving_until_the_model_warmed_up(server):
    seen = server.startup_health
    assert seen and seen[-1] == "SERVING"
    assert "NOT_SERVING" in seen, seen
    assert seen.index("NOT_SERVING") < seen.index("SERVING")

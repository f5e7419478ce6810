"""Several architectures behind one endpoint: each served model equals its package's own calculator,
models are chosen per request, multiplexed checkpoints are evicted and reloaded, a checkpoint that
cannot load leaves the rest serving, and a plugin backend serves like a built-in one."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.md.velocitydistribution import thermalize_momenta
from conftest import CHGNET_ID, family_handle
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_backend_conformance import hco_bulk, hco_molecule, hco_slab
from test_backend_mace import _assert_equals_calculator as assert_equals_mace
from test_backend_mace import _calculator as mace_calculator
from test_backend_mace import gete, gete_slab, gst_frame
from test_backend_sevennet import _assert_equals_calculator as assert_equals_sevennet
from test_backend_sevennet import cu_slab, ethanol, si_bulk
from test_dynamics import _trajectory as trajectory

from mlipserve_client import MLIPClient, RemoteCalculator
from mlipserve_client.errors import ServiceError, ServiceInputError
from mlipserve_client.types import ModelStatus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations"),
]

ALL = ("energy", "forces", "stress", "energies")


def gete_cluster():
    atoms = gete()[:6]
    atoms.pbc = False
    atoms.cell = None
    return atoms


MACE_CASES = {"mace-tiny": ("tiny", [hco_bulk, hco_slab, hco_molecule]),
              "mace-gst": ("gst", [gete, gete_slab, gete_cluster, gst_frame])}


def test_list_models_describes_every_model(client):
    infos = {i.id: i for i in client.list_models()}
    assert set(infos) == {CHGNET_ID, f"{CHGNET_ID}+d3", "mace-tiny", "mace-gst", "mace-broken", "lru-a", "lru-b",
                          "sevennet-0", "emt"}
    for model_id, info in infos.items():
        if model_id == "mace-broken":
            continue
        assert info.status is ModelStatus.AVAILABLE, (model_id, info.status_message)
        assert info.architecture and info.cutoff > 0 and info.elements and info.num_parameters >= 0
        assert info.dtype in ("float32", "float64") and info.device == "cpu" and info.license
    assert infos["mace-gst"].elements == (32, 51, 52) and infos["mace-gst"].dtype == "float64"
    assert infos["mace-gst"].trained and not infos["mace-tiny"].trained
    assert infos["sevennet-0"].architecture.lower().startswith("sevennet") and infos["sevennet-0"].dtype == "float32"
    assert [c.name for c in infos[f"{CHGNET_ID}+d3"].corrections] == ["d3(bj)-pbe"]


@pytest.mark.parametrize("model", MACE_CASES)
def test_mace_served_equals_mace_calculator(client, model):
    short, makers = MACE_CASES[model]
    structures = [make() for make in makers]
    together = client.compute(structures, ALL, model=model)
    for atoms, result in zip(structures, together, strict=True):
        assert_equals_mace(result, atoms, short, "float64")
        (alone,) = client.compute(atoms, ALL, model=model)
        assert_equals_mace(alone, atoms, short, "float64")


def test_sevennet_served_equals_sevennet_calculator(client):
    structures = [si_bulk(), cu_slab(), ethanol()]
    together = client.compute(structures, ALL, model="sevennet-0")
    for atoms, result in zip(structures, together, strict=True):
        assert_equals_sevennet(result, atoms, "7net-0")


def test_plugin_served_equals_ase_emt(client):
    structures = [bulk("Cu", cubic=True) * (2, 1, 1), fcc111("Al", (2, 2, 3), vacuum=6.0), hco_molecule()]
    for atoms in structures:
        atoms.rattle(0.05, seed=4)
    for atoms, result in zip(structures, client.compute(structures, ALL, model="emt"), strict=True):
        atoms.calc = EMT()
        assert result.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(result.forces, atoms.get_forces(), atol=1e-9)


def test_two_clients_two_models_at_once(server):
    """Concurrent requests for different models each get their own model's answer."""
    cases = {CHGNET_ID: gete(), "mace-gst": gete()}
    expected = {}
    with MLIPClient(server.address, timeout=300) as c:
        for model, atoms in cases.items():
            (expected[model],) = c.compute(atoms, ("energy", "forces"), model=model)
    assert abs(expected[CHGNET_ID].energy - expected["mace-gst"].energy) > 0.1  # distinguishable at 1e-5
    got, errors = {m: [] for m in cases}, []

    def run(model):
        try:
            with MLIPClient(server.address, model=model, timeout=300) as own:
                for _ in range(4):
                    (result,) = own.compute(cases[model], ("energy", "forces"))
                    got[model].append(result.energy)
        except Exception as error:  # noqa: BLE001 - asserted below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(m,)) for m in cases for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors
    for model in cases:
        assert got[model] == pytest.approx([expected[model].energy] * 8, abs=1e-5)


def test_multiplexed_family_evicts_and_reloads(client):
    """mace-lru holds one checkpoint at a time: each switch evicts the other and reloads it."""
    handle = family_handle("mace-lru")
    atoms = hco_bulk()
    (a1,) = client.compute(atoms, ("energy", "forces"), model="lru-a")
    assert handle.resident_models.remote().result() == ["lru-a"]
    (b1,) = client.compute(atoms, ("energy", "forces"), model="lru-b")
    assert handle.resident_models.remote().result() == ["lru-b"]
    (a2,) = client.compute(atoms, ("energy", "forces"), model="lru-a")
    assert handle.resident_models.remote().result() == ["lru-a"]
    # Both are the same tiny model by two routes (state_dict, pickle): equal answers, before and after.
    assert a1.energy == pytest.approx(a2.energy, abs=1e-10) == pytest.approx(b1.energy, abs=1e-8)
    np.testing.assert_allclose(a2.forces, a1.forces, atol=1e-10)
    local = atoms.copy()
    local.calc = mace_calculator("tiny", "float64")
    assert a2.energy == pytest.approx(local.get_potential_energy(), abs=1e-6)


def test_broken_checkpoint_is_unavailable_and_the_rest_serves(server, client):
    info = client.get_model("mace-broken")
    assert info.status is ModelStatus.UNAVAILABLE and "failed to load" in info.status_message
    with pytest.raises(ServiceError) as error:
        client.compute(hco_molecule(), model="mace-broken")
    assert error.value.code is grpc.StatusCode.UNAVAILABLE and "failed to load" in error.value.details
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        broken = health.Check(health_pb2.HealthCheckRequest(service="mlipserve.v1.MLIPService/mace-broken"))
        sibling = health.Check(health_pb2.HealthCheckRequest(service="mlipserve.v1.MLIPService/mace-gst"))
        overall = health.Check(health_pb2.HealthCheckRequest())
    assert broken.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert sibling.status == overall.status == health_pb2.HealthCheckResponse.SERVING
    (result,) = client.compute(hco_molecule(), model="mace-tiny")
    assert np.isfinite(result.energy)


def test_untrained_element_is_named(client):
    atoms = gete()
    atoms.numbers[[2, 5]] = 14  # Si: not in the Ge-Sb-Te model
    with pytest.raises(ServiceInputError) as error:
        client.compute(atoms, model="mace-gst")
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not trained on Si (atoms 2, 5)" in error.value.details
    assert "systems[0].atomic_numbers[2]" in error.value.details


def test_unknown_task_is_rejected(client):
    with pytest.raises(ServiceInputError, match="has a single task"):
        client.compute(hco_molecule(), model="mace-tiny", task="omat")


def test_concurrent_requests_merge_into_batches(server):
    """mace-tiny merges (its budget is set): concurrent clients with different sizes share passes."""
    handle = family_handle("mace")
    before = len(handle.batch_history.remote("mace-tiny").result())
    structures = [hco_bulk(), hco_molecule(), hco_slab(), hco_bulk() * (2, 1, 1)] * 3
    expected = []
    with MLIPClient(server.address, model="mace-tiny", timeout=300) as c:
        for atoms in structures:
            (r,) = c.compute(atoms, ("energy", "forces"))
            expected.append(r)
    results: dict[int, object] = {}

    def run(k):
        with MLIPClient(server.address, model="mace-tiny", timeout=300) as own:
            (results[k],) = own.compute(structures[k], ("energy", "forces"))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(structures))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k, want in enumerate(expected):
        assert results[k].energy == pytest.approx(want.energy, abs=1e-9)
        np.testing.assert_allclose(results[k].forces, want.forces, atol=1e-9)
    history = handle.batch_history.remote("mace-tiny").result()[before:]
    assert max(r.n_requests for r in history[len(structures):]) > 1, history


@pytest.mark.parametrize("model", ["mace-gst", "sevennet-0"])
def test_50_md_steps_follow_the_local_trajectory(server, model):
    if model == "mace-gst":
        start, local = gete(), mace_calculator("gst", "float64")
    else:
        from test_backend_sevennet import _calculator

        start, local = si_bulk(), _calculator("7net-0")
    thermalize_momenta(start, temperature_K=600, rng=np.random.default_rng(11))
    remote, _ = trajectory(start.copy(), RemoteCalculator(server.address, model=model, timeout=300), 50)
    reference, _ = trajectory(start.copy(), local, 50)
    tolerance = 1e-8 if model == "mace-gst" else 1e-4  # float64 vs float32
    assert np.abs(remote - reference).max() < tolerance

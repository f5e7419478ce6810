"""Property workflows through the real service (Ray Serve, the front door in the model replicas): each
workflow served equals the same workflow run locally with the model's own calculator; two clients'
workflows share batches; a cancelled call leaves the queue; a malformed structure fails alone; the
whole call's problems get clear statuses."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import FIXTURES, family_handle
from frontdoor_harness import MACE_LOAD_WARNING
from workflows_support import elastic_local, eos_local, phonons_local, relax_local

from mlipserve_client import MLIPClient
from mlipserve_client.convert import system_from_atoms, system_to_proto
from mlipserve_client.convert_workflows import event_from_proto, options_to_proto
from mlipserve_client.errors import InvalidSystemError, ServiceError, ServiceInputError
from mlipserve_client.v1 import service_pb2_grpc
from mlipserve_client.v1 import workflows_pb2 as pb
from mlipserve_client.workflow_types import (
    DiatomicOptions,
    ElasticOptions,
    EOSOptions,
    PhononOptions,
    RelaxOptions,
    RelaxResult,
    StructureError,
    WorkflowProgress,
    WorkflowSummary,
)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]

TINY = "mace-tiny"
# Never converges: runs until cancelled or max_steps.
ENDLESS = RelaxOptions(fmax=1e-9, max_steps=100_000)


def crystals() -> list[Atoms]:
    """Si and Cu a little off their CHGNet lattice constants, so that the first relaxation moves."""
    return [bulk("Si", "diamond", a=5.40), bulk("Cu", "fcc", a=3.66)]


def molecules(n: int) -> list[Atoms]:
    """Small H/C/O molecules for the tiny MACE model, each a little different."""
    names = ["H2O", "CH4", "CO2", "CH3OH", "H2CO"]
    out = []
    for k in range(n):
        atoms = molecule(names[k % len(names)])
        atoms.rattle(0.02, seed=k)
        out.append(atoms)
    return out


def wire(atoms: Atoms):
    return system_to_proto(system_from_atoms(atoms))


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.MLIPServiceStub(channel)


def test_relax_served_equals_local(client, chgnet_calc):
    options = RelaxOptions(fmax=0.01)
    rattled = [bulk("Si", "diamond", a=5.40, cubic=True), bulk("Cu", "fcc", a=3.66) * (2, 1, 1)]
    for k, atoms in enumerate(rattled):
        atoms.rattle(0.03, seed=k)
    for atoms, served in zip(rattled, client.relax(rattled, options), strict=True):
        local = relax_local(atoms, chgnet_calc, options)
        assert isinstance(served, RelaxResult) and served.converged and served.steps > 3
        relaxed = served.atoms()
        np.testing.assert_allclose(relaxed.cell.cellpar()[:3], local.cell.cellpar()[:3], atol=1e-3, rtol=0)
        assert relaxed.get_potential_energy() == pytest.approx(local.get_potential_energy(), abs=1e-4 * len(atoms))


def test_eos_and_elastic_served_equal_local(client, chgnet_calc):
    eos_options, elastic_options = EOSOptions(n_points=7), ElasticOptions()
    for atoms, served in zip(crystals(), client.eos(crystals(), eos_options), strict=True):
        v0, b0, _ = eos_local(atoms, chgnet_calc, eos_options)
        assert served.bracketed and served.b0_gpa == pytest.approx(b0, abs=0.5)
        assert served.v0 == pytest.approx(v0, abs=1e-3 * len(atoms))
    for atoms, served in zip(crystals(), client.elastic(crystals(), elastic_options), strict=True):
        local = elastic_local(atoms, chgnet_calc, elastic_options)
        np.testing.assert_allclose(served.tensor_gpa, local.voigt, atol=1.0, rtol=0)
        assert served.k_vrh_gpa == pytest.approx(local.k_vrh, abs=1.0)


def test_phonons_served_equal_local(client, chgnet_calc):
    options = PhononOptions(supercell=(2, 2, 2), mesh=(6, 6, 6), band_points=11, t_step=250.0)
    for atoms, served in zip(crystals(), client.phonons(crystals(), options), strict=True):
        local = phonons_local(atoms, chgnet_calc, options)
        gamma = local.run_qpoints([[0.0, 0.0, 0.0]]).frequencies[0]
        np.testing.assert_allclose(served.gamma_thz, gamma, atol=0.05, rtol=0)
        assert len(served.band_distances) == len(served.band_frequencies_thz) == len(served.band_connections)


def test_diatomics_served_equal_local(client):
    from mace.calculators import MACECalculator

    model = torch.load(FIXTURES / "mace" / "mace_swa_GeSbTe.model", map_location="cpu", weights_only=False)
    calc = MACECalculator(models=[model], device="cpu", default_dtype="float64")
    served = client.diatomics(["Te", "Ge"], DiatomicOptions(step=0.1), heteronuclear=True, model="mace-gst")
    assert [r.numbers for r in served] == [(32, 32), (32, 52), (52, 52)]
    for curve in served:
        energies = []
        for r in curve.distances:
            atoms = Atoms(numbers=curve.numbers, positions=[[0, 0, 0], [r, 0, 0]])
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
        np.testing.assert_allclose(curve.energies, energies, atol=1e-6, rtol=0)


def _history() -> list:
    return family_handle("mace").batch_history.remote(TINY).result(timeout_s=60)


def test_two_clients_workflows_share_batches(server):
    """Three structures per client, so each has at most three requests in flight: a pass of four or
    more requests holds both clients' work."""
    before = len(_history())
    results = {}
    structures = molecules(6)

    def run(name: str, mine: list[Atoms]) -> None:
        with MLIPClient(server.address, model=TINY, timeout=120) as own:
            results[name] = own.relax(mine, RelaxOptions(fmax=1e-9, max_steps=15))

    threads = [threading.Thread(target=run, args=(name, structures[k::2])) for k, name in enumerate("ab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(r, RelaxResult) and r.steps == 15 for rs in results.values() for r in rs), results
    passes = _history()[before:]
    assert max(r.n_requests for r in passes) >= 4, [r.n_requests for r in passes]


def test_cancelling_a_workflow_frees_the_queue(stub, client):
    request = pb.RelaxRequest(model=TINY, structures=[wire(a) for a in molecules(8)],
                              options=options_to_proto(ENDLESS))
    call = stub.Relax(request, timeout=120)
    for message in call:
        event = event_from_proto(message)
        if isinstance(event, WorkflowProgress) and any(s.step >= 3 for s in event.structures):
            break
    call.cancel()
    time.sleep(1.0)  # the batch that was running finishes; the withdrawn requests go
    settled = _history()
    time.sleep(1.5)
    assert _history() == settled  # nothing submitted since
    start = time.perf_counter()
    (result,) = client.compute(molecules(1), model=TINY, timeout=30)
    assert result.energy is not None and time.perf_counter() - start < 5.0


@pytest.mark.parametrize("bad", ["non-finite-position", "unsupported-element"])
def test_a_malformed_structure_fails_alone(client, bad):
    structures = molecules(10)
    if bad == "non-finite-position":
        structures[4].positions[0, 0] = np.nan
        field, message = "structures[4].positions[0]", "non-finite position"
    else:
        structures[4].numbers[1] = 14
        field, message = "structures[4].atomic_numbers[1]", "not trained on Si"
    events = []
    results = client.relax(structures, RelaxOptions(max_steps=3), model=TINY, on_event=events.append)
    error = results[4]
    assert isinstance(error, StructureError) and (error.code, error.field) == ("INVALID_ARGUMENT", field)
    assert message in error.message
    assert all(isinstance(r, RelaxResult) for k, r in enumerate(results) if k != 4)
    assert isinstance(events[-1], WorkflowSummary) and (events[-1].succeeded, events[-1].failed) == (9, 1)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    return error.value.code(), error.value.details()


def test_limits_and_bad_requests_get_clear_statuses(server, stub, client):
    with pytest.raises(ServiceError) as limit:
        client.relax(molecules(1) * 1001, model=TINY)
    assert limit.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "structures: the number of structures is 1,001" in limit.value.details
    assert "server.limits.max_systems_per_request" in limit.value.details
    one = [wire(molecules(1)[0])]
    cases = [
        (stub.Relax(pb.RelaxRequest(model=TINY, structures=one, options=pb.RelaxOptions(fmax=-1)), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "options.fmax: must be > 0"),
        (stub.Relax(pb.RelaxRequest(model=TINY, structures=one, options=pb.RelaxOptions(optimizer=7)), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "options.optimizer: unknown value 7"),
        (stub.EquationOfState(pb.EquationOfStateRequest(model=TINY, structures=one,
                                                        options=pb.EOSOptions(n_points=3)), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "options.n_points"),
        (stub.Diatomics(pb.DiatomicsRequest(model="mace-gst", elements=["Ge", "Xx"]), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "elements[1]: 'Xx' is not an element symbol"),
        (stub.Relax(pb.RelaxRequest(model="nope", structures=one), timeout=30), grpc.StatusCode.NOT_FOUND,
         "unknown model 'nope'"),
        (stub.Relax(pb.RelaxRequest(model=TINY, structures=one, task="r2scan"), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "task: model 'mace-tiny' has no task 'r2scan'"),
    ]
    for call, code, message in cases:
        got, details = _status(call)
        assert got is code and message in details, (got, details)
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_stream("/mlipserve.v1.MLIPService/Phonons")(b"\xff\xff", timeout=30)
        code, details = _status(raw)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "not a valid mlipserve.v1.PhononsRequest" in details
    with pytest.raises(InvalidSystemError, match=r"elements\[0\]"):
        client.diatomics(["Qq"], model="mace-gst")  # checked before any call
    (molecular,) = client.eos(molecules(1), model=TINY)
    assert molecular.code == "INVALID_ARGUMENT" and molecular.field == "structures[0].pbc"
    with pytest.raises(ServiceInputError):
        client.relax(molecules(1), model="nope")


def test_reflection_lists_the_workflow_rpcs(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("mlipserve.v1.MLIPService")
        methods = {m.name: m for m in service.methods}
    assert {"Relax", "EquationOfState", "Elastic", "Phonons", "Diatomics"} <= set(methods)
    assert methods["Relax"].server_streaming and methods["Relax"].output_type.full_name == "mlipserve.v1.WorkflowEvent"

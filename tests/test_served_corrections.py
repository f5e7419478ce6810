"""Corrections at serving time, end to end: per request and baked into a model id, equal to the
model's own calculator plus the physics module; energy conservation of MD through the service."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ase import units
from ase.build import fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from conftest import CHGNET_ID, nacl_rattled
from test_backend_mace import _calculator as mace_calculator
from test_backend_mace import gete

from mlipserve.backends.base import Batch
from mlipserve.physics.corrected import build_correction
from mlipserve_client import RemoteCalculator
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.errors import ServiceInputError
from mlipserve_client.types import Dispersion, Electrostatics, Property

pytestmark = pytest.mark.integration

ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})
GST_CUTOFF = 5.0


class WithCorrection(Calculator):
    """A local calculator plus one correction evaluated in-process: the reference."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base: Calculator, spec, model_cutoff: float) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.correction = build_correction(spec, model_cutoff, "cpu")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        model = self.atoms.copy()
        model.calc = self.base
        periodic = self.atoms.cell.rank == 3
        (term,) = self.correction.compute(
            Batch((system_from_atoms(self.atoms),), ALL if periodic else ALL - {Property.STRESS}))
        energy = model.get_potential_energy() + term.energy
        self.results = {"energy": energy, "free_energy": energy, "forces": model.get_forces() + term.forces}
        if periodic:
            self.results["stress"] = model.get_stress() + term.stress


def charged_gete(total=0.0):
    atoms = gete()
    charges = np.where(atoms.numbers == 32, 0.3, -0.3) + total / len(atoms)
    atoms.set_initial_charges(charges)
    atoms.info["charge"] = total
    return atoms


@pytest.mark.parametrize("total", [0.0, 1.0], ids=["neutral", "charged"])
def test_electrostatics_with_request_charges_equals_local(client, total):
    atoms = charged_gete(total)
    spec = Electrostatics(method="pme", charges="request")
    (served,) = client.compute(atoms, ("energy", "forces", "stress"), model="mace-gst", corrections=[spec])
    assert list(served.corrections) == ["electrostatics(pme, request)"]
    np.testing.assert_allclose(served.charges, atoms.get_initial_charges())
    reference = atoms.copy()
    reference.calc = WithCorrection(mace_calculator("gst", "float64"), spec, GST_CUTOFF)
    assert served.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(served.forces, reference.get_forces(), atol=1e-6)
    np.testing.assert_allclose(served.stress, reference.get_stress(), atol=1e-6)
    (bare,) = client.compute(atoms, ("energy",), model="mace-gst")
    assert served.energy - bare.energy == pytest.approx(served.corrections["electrostatics(pme, request)"], abs=1e-6)


def test_composite_model_and_request_correction(client, chgnet_calc):
    atoms = nacl_rattled()
    (composite,) = client.compute(atoms, ("energy", "forces", "stress"), model=f"{CHGNET_ID}+d3")
    (plain,) = client.compute(atoms, ("energy", "forces", "stress"), model=CHGNET_ID, corrections=[Dispersion()])
    assert list(composite.corrections) == list(plain.corrections) == ["d3(bj)-pbe"]
    assert composite.energy == pytest.approx(plain.energy, abs=1e-5)
    reference = atoms.copy()
    reference.calc = WithCorrection(chgnet_calc, Dispersion(), 6.0)
    assert composite.energy == pytest.approx(reference.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(composite.forces, reference.get_forces(), atol=1e-4)
    np.testing.assert_allclose(composite.stress, reference.get_stress(), atol=1e-5)
    assert composite.corrections["d3(bj)-pbe"] < 0


def test_qeq_charges_and_both_corrections_on_a_molecule(client):
    from ase.build import molecule

    (result,) = client.compute(molecule("H2O"), ("energy", "forces"), model=CHGNET_ID,
                               corrections=[Electrostatics(), Dispersion()])
    assert list(result.corrections) == ["electrostatics(auto, qeq)", "d3(bj)-pbe"]
    o, h1, h2 = result.charges
    assert o < 0 < h1 and h1 == pytest.approx(h2) and result.charges.sum() == pytest.approx(0, abs=1e-10)


def test_remote_calculator_reports_charges_and_correction_energies(server, client):
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.calc = RemoteCalculator(server.address, model=CHGNET_ID, corrections=[Electrostatics(), Dispersion()])
    (direct,) = client.compute(atoms, ("energy", "forces"), model=CHGNET_ID,
                               corrections=[Electrostatics(), Dispersion()])
    np.testing.assert_allclose(atoms.get_charges(), direct.charges, atol=1e-12)
    assert atoms.calc.results["corrections"] == pytest.approx(direct.corrections, abs=1e-9)
    assert atoms.get_potential_energy() == pytest.approx(direct.energy, abs=1e-9)


@pytest.mark.parametrize(("corrections", "atoms", "words"), [
    ([Electrostatics(charges="request")], gete, "systems[0].atomic_charges"),
    ([Electrostatics(charges="model")], charged_gete, "does not predict charges"),
    ([Electrostatics()], lambda: fcc111("Cu", (2, 2, 3), vacuum=5), "slabs are not supported"),
    ([Dispersion(), Dispersion()], gete, "already applied"),
    ([Dispersion("nosuchfunctional")], gete, "nosuchfunctional"),
])
def test_bad_corrections_get_invalid_argument(client, corrections, atoms, words):
    model = "mace-gst" if atoms is not None and atoms is not fcc111 else CHGNET_ID
    structure = atoms()
    with pytest.raises(ServiceInputError) as error:
        client.compute(structure, model=model if set(structure.numbers) <= {32, 51, 52} else CHGNET_ID,
                       corrections=corrections)
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details


def _nve(atoms, calc, steps):
    atoms.calc = calc
    totals, positions = [], []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)

    def record():
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        positions.append(atoms.positions.copy())

    dyn.attach(record, interval=1)
    dyn.run(steps)
    return np.array(totals), np.array(positions)


def test_nve_md_with_mace_and_pme_conserves_energy_as_well_as_local(server):
    spec = Electrostatics(method="pme", charges="request")
    start = charged_gete()
    thermalize_momenta(start, temperature_K=300, rng=np.random.default_rng(5))
    remote = RemoteCalculator(server.address, model="mace-gst", corrections=[spec], timeout=300)
    served_total, served_path = _nve(start.copy(), remote, 500)
    local_total, local_path = _nve(start.copy(), WithCorrection(mace_calculator("gst", "float64"), spec, GST_CUTOFF),
                                   500)
    served_drift = np.ptp(served_total)
    local_drift = np.ptp(local_total)
    assert served_drift <= 1.05 * local_drift + 1e-6, (served_drift, local_drift)
    assert served_drift < 5e-3 * len(start)  # eV: a conserving integration at 1 fs
    np.testing.assert_allclose(served_path, local_path, atol=1e-6)

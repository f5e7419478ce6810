"""RemoteCalculator as a drop-in ASE calculator: MD and cell relaxation follow the local run."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from conftest import CHGNET_ID, ethanol_no_cell

from mlipserve_client import RemoteCalculator

pytestmark = pytest.mark.integration


def _rattled_si():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(stdev=0.05, seed=7)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(7))
    return atoms


def _trajectory(atoms, calc, steps):
    atoms.calc = calc
    positions = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(lambda: positions.append(atoms.positions.copy()), interval=1)
    dyn.run(steps)
    return np.array(positions), atoms.get_potential_energy() + atoms.get_kinetic_energy()


def test_100_md_steps_follow_the_local_trajectory(server, chgnet_calc):
    remote = RemoteCalculator(server.address, model=CHGNET_ID, timeout=60)
    served, served_total = _trajectory(_rattled_si(), remote, 100)
    local, local_total = _trajectory(_rattled_si(), chgnet_calc, 100)
    assert served.shape == local.shape == (101, 64, 3)
    assert np.abs(served - local).max() < 1e-4
    assert served_total == pytest.approx(local_total, abs=1e-3)
    remote.close()


def test_cell_relaxation_matches_local(server, chgnet_calc):
    def relax(calc):
        atoms = bulk("Si", "diamond", a=5.6, cubic=True)
        atoms.rattle(0.02, seed=3)
        atoms.calc = calc
        BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.02, steps=60)
        return atoms

    served = relax(RemoteCalculator(server.address, model=CHGNET_ID))
    local = relax(chgnet_calc)
    assert served.cell.cellpar()[0] == pytest.approx(local.cell.cellpar()[0], abs=1e-3)
    assert np.abs(served.get_stress()).max() < 0.02


def test_energy_and_forces_in_one_round_trip_and_stress_needs_a_cell(server):
    calc = RemoteCalculator(server.address, model=CHGNET_ID)
    atoms = ethanol_no_cell()
    atoms.calc = calc
    forces = atoms.get_forces()
    assert "energy" in calc.results  # fetched with the forces: the next call is free
    assert atoms.get_potential_energy() == calc.results["energy"] == atoms.get_potential_energy(force_consistent=True)
    assert forces.shape == (9, 3)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_calculator_parameters_are_json_safe(server):
    import json

    calc = RemoteCalculator(server.address, model=CHGNET_ID, timeout=30)
    assert json.loads(json.dumps(calc.todict())) == {"address": server.address, "model": CHGNET_ID, "timeout": 30}

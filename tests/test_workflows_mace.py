"""Diatomic curves, a full relaxation and the workflows' concurrent fixed-cell relaxations through the
engine and a batch queue over the trained Ge-Sb-Te MACE (float64) equal MACE's own calculator run
locally with the same libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.data import covalent_radii, vdw_alvarez
from ase.io import read
from workflows_support import elastic_local, eos_local, relax_local, run_served, single_threaded  # noqa: F401 - fixture

from mlipserve.backends.mace import MACEBackend
from mlipserve.workflows import diatomic_systems
from mlipserve.workflows.diatomics import checks
from mlipserve_client.convert import atoms_from_system
from mlipserve_client.workflow_types import DiatomicOptions, ElasticOptions, EOSOptions, RelaxOptions

pytestmark = pytest.mark.filterwarnings(
    "ignore:The TorchScript type system doesn't support instance-level annotations")

MACE = "tests/fixtures/mace/mace_swa_GeSbTe"


@pytest.fixture(scope="module")
def backend() -> MACEBackend:
    return MACEBackend(model_id="mace-gst", dtype="float64", state_dict=f"{MACE}.state_dict.pt",
                       config=f"{MACE}.config.json")


@pytest.fixture(scope="module")
def calc():
    from mace.calculators import MACECalculator

    model = torch.load(f"{MACE}.model", map_location="cpu", weights_only=False)  # our own fixture file
    return MACECalculator(models=[model], device="cpu", default_dtype="float64")


def gete() -> Atoms:
    atoms = read("tests/fixtures/structures/GeTe_rocksalt_cubic_a6.0_rattle0.05_seed42.extxyz")
    atoms.calc = None  # the file's SinglePointCalculator
    return atoms


def test_diatomic_curves_equal_local(backend, calc):
    options = DiatomicOptions(step=0.05)
    dimers = diatomic_systems(["Ge", "Sb", "Te"], heteronuclear=True)
    assert [tuple(d.numbers) for d in dimers] == [(32, 32), (32, 51), (32, 52), (51, 51), (51, 52), (52, 52)]
    for dimer, served in zip(dimers, run_served(backend, options, [atoms_from_system(d) for d in dimers]),
                             strict=True):
        z1, z2 = (int(z) for z in dimer.numbers)
        # MLIP Arena's range: 0.9 x covalent radius to 3.1 x van der Waals radius
        assert served.distances[0] == pytest.approx(0.9 * (covalent_radii[z1] + covalent_radii[z2]) / 2)
        assert served.distances[-1] == pytest.approx(3.1 * max(vdw_alvarez.vdw_radii[[z1, z2]]))
        energies, forces = [], []
        for r in served.distances:
            atoms = Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [r, 0, 0]])
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces()[1, 0])
        np.testing.assert_allclose(served.energies, energies, atol=1e-6, rtol=0)
        np.testing.assert_allclose(served.forces, forces, atol=1e-6, rtol=0)
        local = checks(served.distances, np.array(energies), np.array(forces), options)
        # (a bulk model's dimers need not pass them: the checks are compared, not judged)
        assert served.checks.to_dict() == pytest.approx(local.to_dict(), abs=1e-6)


def test_diatomic_checks_of_a_morse_curve():
    """The checks on an analytic curve: one force sign flip, energy monotone on both sides."""
    r = np.linspace(1.0, 6.0, 1001)
    depth, width, r0 = 2.0, 1.5, 2.2
    energies = depth * (1 - np.exp(-width * (r - r0))) ** 2 - depth
    forces = -2 * depth * width * np.exp(-width * (r - r0)) * (1 - np.exp(-width * (r - r0)))
    result = checks(r, energies, forces, DiatomicOptions())
    assert result.equilibrium_distance == pytest.approx(r0, abs=0.03)
    assert result.well_depth == pytest.approx(depth + energies[-1], abs=0.01)  # relative to the far end
    assert (result.force_flips, result.energy_diff_flips) == (1, 1)
    assert result.tortuosity == pytest.approx(1.0) and result.energy_jump < 0.01
    assert result.conservation_deviation < 0.01
    assert (result.spearman_repulsion, result.spearman_attraction) == (pytest.approx(-1.0), pytest.approx(1.0))


def test_relax_positions_and_cell_equals_local(backend, calc):
    options = RelaxOptions(optimizer="BFGS", fmax=0.005)
    (served,) = run_served(backend, options, [gete()])
    local = relax_local(gete(), calc, options)
    assert served.converged and served.steps > 3
    np.testing.assert_allclose(served.cell, local.cell.array, atol=1e-6, rtol=0)
    np.testing.assert_allclose(served.positions, local.positions, atol=1e-6, rtol=0)
    assert served.energy == pytest.approx(local.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(served.stress, local.get_stress(), atol=1e-8, rtol=0)


def test_relaxed_points_eos_and_relaxed_ion_elastic_equal_local(backend, calc):
    """relax_points / relax_deformed: each strained cell relaxed at fixed cell, concurrently."""
    crystal = bulk("GeTe", "rocksalt", a=6.0) * (2, 1, 1)
    crystal.rattle(0.02, seed=3)  # internal coordinates to relax
    relax = RelaxOptions(fmax=0.01)
    eos_options = EOSOptions(relax=relax, relax_points=True, n_points=7)
    (eos,) = run_served(backend, eos_options, [crystal])
    v0, b0, _ = eos_local(crystal, calc, eos_options)
    # the local reference relaxes each volume too
    assert eos.b0_gpa == pytest.approx(b0, abs=0.5) and eos.v0 == pytest.approx(v0, abs=1e-3)

    elastic_options = ElasticOptions(relax=relax, relax_deformed=True, norm_strains=(-0.01, 0.01),
                                     shear_strains=(-0.02, 0.02))
    (elastic,) = run_served(backend, elastic_options, [crystal])
    local = elastic_local(crystal, calc, elastic_options)
    np.testing.assert_allclose(elastic.tensor_gpa, local.voigt, atol=1.0, rtol=0)

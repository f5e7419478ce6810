"""Relax, EOS, elastic constants and phonons of Si and Cu through the workflow engine and a batch queue
over the CHGNet backend equal the same workflows run locally with CHGNetCalculator (float32: the
issue's tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from workflows_support import (  # noqa: F401 - chgnet_backend and single_threaded are fixtures
    chgnet_backend,
    elastic_local,
    eos_local,
    phonons_local,
    relax_local,
    run_served,
    single_threaded,
)

from mlipserve_client.workflow_types import ElasticOptions, EOSOptions, PhononOptions, RelaxOptions

# CHGNet's own calculator converts a tensor that requires grad (its stress volume).


def crystals():
    """Si and Cu a little off their CHGNet lattice constants, so that the first relaxation moves."""
    return [bulk("Si", "diamond", a=5.40), bulk("Cu", "fcc", a=3.66)]


def test_relax_equals_local(chgnet_backend, chgnet_calc):
    options = RelaxOptions(fmax=0.01)
    rattled = [bulk("Si", "diamond", a=5.40, cubic=True), bulk("Cu", "fcc", a=3.66) * (2, 1, 1)]
    for k, atoms in enumerate(rattled):
        atoms.rattle(0.03, seed=k)
    for atoms, served in zip(rattled, run_served(chgnet_backend, options, rattled), strict=True):
        local = relax_local(atoms, chgnet_calc, options)
        assert served.converged and served.steps > 3
        np.testing.assert_allclose(served.atoms().cell.cellpar()[:3], local.cell.cellpar()[:3], atol=1e-3, rtol=0)
        np.testing.assert_allclose(served.positions, local.positions, atol=1e-3, rtol=0)
        assert served.energy == pytest.approx(local.get_potential_energy(), abs=1e-4 * len(atoms))
        assert served.max_force < options.fmax * 1.5  # the filter's criterion also counts the cell


def test_eos_equals_local(chgnet_backend, chgnet_calc):
    options = EOSOptions()
    for atoms, served in zip(crystals(), run_served(chgnet_backend, options, crystals()), strict=True):
        v0, b0, b0_prime = eos_local(atoms, chgnet_calc, options)
        assert served.bracketed and len(served.volumes) == options.n_points
        assert served.b0_gpa == pytest.approx(b0, abs=0.5)
        assert served.v0 == pytest.approx(v0, abs=1e-3)
        assert served.b0_prime == pytest.approx(b0_prime, abs=0.05)


def test_elastic_equals_local(chgnet_backend, chgnet_calc):
    options = ElasticOptions()
    for atoms, served in zip(crystals(), run_served(chgnet_backend, options, crystals()), strict=True):
        local = elastic_local(atoms, chgnet_calc, options)
        np.testing.assert_allclose(served.tensor_gpa, local.voigt, atol=1.0, rtol=0)
        for name in ("k_voigt", "k_reuss", "k_vrh", "g_voigt", "g_reuss", "g_vrh"):
            assert getattr(served, f"{name}_gpa") == pytest.approx(getattr(local, name), abs=1.0), name
        # cubic: C11 = C22 = C33, C44 = C55 = C66
        c = served.tensor_gpa
        assert c[0, 0] == pytest.approx(c[2, 2], abs=0.5) and c[3, 3] == pytest.approx(c[5, 5], abs=0.5)


def test_phonons_equal_local(chgnet_backend, chgnet_calc):
    options = PhononOptions(supercell=(2, 2, 2), mesh=(8, 8, 8), band_points=21, t_step=100.0)
    for atoms, served in zip(crystals(), run_served(chgnet_backend, options, crystals()), strict=True):
        local = phonons_local(atoms, chgnet_calc, options)
        gamma = local.run_qpoints([[0.0, 0.0, 0.0]]).frequencies[0]
        np.testing.assert_allclose(served.gamma_thz, gamma, atol=0.05, rtol=0)
        assert served.n_displacements == len(local.supercells_with_displacements) == 1
        assert np.abs(served.gamma_thz[:3]).max() < 0.1  # acoustic modes
        assert served.band_labels[0] == "$\\Gamma$" and len(served.band_distances) == len(served.band_connections)
        assert served.heat_capacity_j_k_mol[-1] == pytest.approx(3 * len(atoms) * 8.314, rel=0.05)  # Dulong-Petit
        local.run_mesh(list(options.mesh), is_gamma_center=True)
        thermal = local.run_thermal_properties(t_step=options.t_step, exclude_gamma_acoustic=True)
        np.testing.assert_allclose(served.free_energy_kj_mol, thermal.free_energy, atol=0.05, rtol=0)

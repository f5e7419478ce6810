"""Third-party backends: the worked example in examples/mlipserve-emt, found through the
``mlipserve.backends`` entry-point group after a real pip install."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT

from mlipserve.backends import backend_class, load_backend
from mlipserve.backends.base import Backend, Batch
from mlipserve.config import ModelConfig
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property

ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES})


def test_entry_point_finds_the_plugin(emt_plugin):
    cls = backend_class("emt")
    assert cls.__module__ == "mlipserve_emt"
    backend = load_backend(ModelConfig(id="emt-test", backend="emt"), "cpu")
    assert isinstance(backend, Backend) and backend.info.id == "emt-test"
    with pytest.raises(ValueError, match="unknown backend 'nope'; known: .*emt"):
        backend_class("nope")


@pytest.mark.parametrize("atoms", [bulk("Cu", cubic=True) * (2, 2, 2), fcc111("Al", (2, 2, 3), vacuum=6.0),
                                   molecule("CH3CH2OH")], ids=["bulk", "slab", "molecule"])
def test_plugin_equals_ase_emt(emt_plugin, atoms):
    atoms.rattle(0.05, seed=3)
    backend = load_backend(ModelConfig(id="emt", backend="emt"), "cpu")
    (result,) = backend.compute(Batch((system_from_atoms(atoms),), ALL))
    atoms.calc = EMT()
    assert result.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.forces, atoms.get_forces(), atol=1e-10)
    if atoms.cell.rank == 3:
        np.testing.assert_allclose(result.stress, atoms.get_stress(), atol=1e-10)
    else:
        assert result.stress is None

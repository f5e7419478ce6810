"""SevenNet backend in-process: equal to SevenNet's own ASE calculator for a crystal, a slab, a
molecule and a batch mixing them (SevenNet-0 and 7net-l3i5), and clear refusals for what sevenn
0.10.4 lacks. Systems stay small: SevenNet-0 takes ~240 ms for 64 atoms on this CPU."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from mlipserve.backends.base import Backend, Batch
from mlipserve.backends.sevennet import SevenNetBackend
from mlipserve.errors import UnsupportedElementError
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property

pytestmark = pytest.mark.filterwarnings(
    "ignore:The TorchScript type system doesn't support instance-level annotations"
)

ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES})
# float32 model: the fixtures README's float32 tolerances; stress and per-atom energies alike.
E_ABS, E_REL, F_TOL, S_TOL = 1e-3, 1e-6, 1e-4, 1e-6


@cache
def _backend(checkpoint: str) -> SevenNetBackend:
    return SevenNetBackend(model_id=checkpoint, checkpoint=checkpoint)


@cache
def _calculator(checkpoint: str):
    """SevenNet's calculator with its own model: it switches the model to unbatched mode."""
    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 on torch 2.13, if imported first here
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(model=checkpoint, device="cpu")


def si_bulk() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(stdev=0.03, seed=1)
    atoms.set_cell(atoms.cell * 0.98, scale_atoms=True)  # compressed: non-zero stress
    return atoms


def cu_slab() -> Atoms:
    atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)  # periodic in x and y only
    atoms.rattle(stdev=0.02, seed=2)
    return atoms


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")  # no cell


STRUCTURES = {"bulk": si_bulk, "slab": cu_slab, "molecule": ethanol}


def _assert_equals_calculator(result, atoms: Atoms, checkpoint: str) -> None:
    atoms = atoms.copy()
    atoms.calc = _calculator(checkpoint)
    # TorchScript's profiling executor re-optimises SevenNet's scripted e3nn modules for each new
    # unbatched input shape, 8-13 s a call on this CPU; unoptimised, the reference takes ~0.3 s.
    with torch.jit.optimized_execution(False):  # thread-local, restored on exit
        atoms.calc.calculate(atoms)
    reference = atoms.calc.results
    assert abs(result.energy - reference["energy"]) <= E_ABS + E_REL * abs(reference["energy"])
    np.testing.assert_allclose(result.forces, reference["forces"], atol=F_TOL, rtol=0)
    np.testing.assert_allclose(result.energies, reference["energies"], atol=F_TOL, rtol=0)
    if atoms.cell.rank < 3:
        assert result.stress is None  # SevenNet's own number divides by a zero volume
    else:
        np.testing.assert_allclose(result.stress, reference["stress"], atol=S_TOL, rtol=0)


@pytest.mark.parametrize("kind", STRUCTURES)
def test_single_system_equals_sevennet_calculator(kind):
    atoms = STRUCTURES[kind]()
    (result,) = _backend("7net-0").compute(Batch((system_from_atoms(atoms),), ALL))
    _assert_equals_calculator(result, atoms, "7net-0")


@pytest.mark.parametrize("checkpoint", ["7net-0", "7net-l3i5"])
def test_mixed_batch_equals_sevennet_calculator(checkpoint):
    atoms_list = [si_bulk(), ethanol(), cu_slab()] if checkpoint == "7net-0" else [si_bulk(), ethanol()]
    results = _backend(checkpoint).compute(Batch(tuple(system_from_atoms(a) for a in atoms_list), ALL))
    assert len(results) == len(atoms_list)
    for atoms, result in zip(atoms_list, results, strict=True):
        _assert_equals_calculator(result, atoms, checkpoint)


def test_info():
    backend = _backend("7net-0")
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.architecture, info.cutoff, info.dtype, info.trained) == ("SevenNet", 5.0, "float32", True)
    assert info.version.startswith("SevenNet-0 (11Jul2024)") and "MPtrj" in info.training_data
    assert len(info.elements) == 89 and info.num_parameters == 842_623
    assert info.license.startswith("GPL-3.0") and info.tasks == () and info.default_task == ""


def test_checkpoint_by_path():
    from sevenn.util import pretrained_name_to_path

    path = pretrained_name_to_path("7net-0")
    backend = SevenNetBackend(model_id="by-path", checkpoint=path, training_data="MPtrj")
    assert backend.info.version.startswith("checkpoint_sevennet_0") and backend.info.training_data == "MPtrj"
    # The same weights as by name (comparing outputs would cost a second ~10 s TorchScript warm-up).
    by_name = _backend("7net-0").model.state_dict()
    by_path = backend.model.state_dict()
    assert by_path.keys() == by_name.keys()
    assert all(torch.equal(by_path[k], by_name[k]) for k in by_name)


@pytest.mark.parametrize(("options", "match"), [
    ({"checkpoint": "7net-mf-0"}, "sevenn >= 0.11"),
    ({"checkpoint": "7net-0", "modal": "PBE"}, "sevenn >= 0.11"),
    ({"checkpoint": "no-such-model"}, "unknown SevenNet checkpoint"),
])
def test_unavailable_checkpoints_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        SevenNetBackend(model_id="bad", **options)


def test_task_is_refused():
    with pytest.raises(ValueError, match="single task"):
        _backend("7net-0").compute(Batch((system_from_atoms(ethanol()),), ALL, task="PBE"))


def test_unknown_element_names_system_and_atom():
    polonium = Atoms("CPo", positions=[[0, 0, 0], [2.0, 0, 0]])  # Po (84) is not in MPtrj
    with pytest.raises(UnsupportedElementError, match="Z=84") as err:
        _backend("7net-0").compute(Batch((system_from_atoms(ethanol()), system_from_atoms(polonium)), ALL))
    assert err.value.field == "systems[1].atomic_numbers[1]"

"""fairchem backend in-process (no Ray): equal to fairchem's own FAIRChemCalculator on small eSEN and
UMA models with random weights, built here from fairchem's own model classes and config layout.

fairchem-core needs e3nn >= 0.5 and cannot be installed beside mace-torch (e3nn 0.4.4): these tests
are skipped in the main environment and run in fairchem's own one (README of the backend module:
service/mlipserve/backends/fairchem.py), e.g.
    /work/fairchem-venv/bin/python -m pytest tests/test_backend_fairchem.py
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fairchem.core")

from ase.build import bulk, fcc111, molecule

from mlipserve.backends.base import Backend, Batch
from mlipserve.backends.fairchem import FAIRChemBackend
from mlipserve.errors import InvalidSystemError
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Property

# fairchem's UMA composition embedding calls torch's index_reduce, which warns once per process.
pytestmark = pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning")

EFS = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})
UMA_TASKS = ("omat", "omol", "oc20", "odac", "omc")
# float32 model: the tolerances.
F_TOL, S_TOL = 1e-4, 1e-5


def e_tol(energy: float) -> float:
    return 1e-6 * abs(energy) + 1e-3


# --- checkpoints -----------------------------------------------------------------------------------


def build_small_checkpoint(path, datasets=("omat",), num_experts=0, model_id=None, seed=0) -> str:
    """A small fairchem inference checkpoint with random weights, in fairchem's own format.

    The model is fairchem's HydraModel with its eSCNMD backbone and MLP_EFS_Head, configured as in
    fairchem's configs/uma/training_release (backbone K4L2_1p2, tasks uma_conserving_stress_1p2) but
    tiny: num_experts=0 with one DatasetSpecificSingleHeadWrapper is eSEN, num_experts>0 with a
    DatasetSpecificMoEWrapper is UMA (mixture of linear experts; UMA checkpoints need a model_id).
    Tasks per dataset: <d>_energy (with random element references), <d>_forces, <d>_stress.
    Saved as MLIPInferenceCheckpoint(model_config, model_state_dict, ema_state_dict, tasks_config),
    which fairchem's load_predict_unit reads.
    """
    import hydra
    import torch
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    datasets = list(datasets)
    mapping = {d: d for d in datasets}
    backbone = {
        "model": "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone",
        "num_experts": num_experts,
        "moe_dropout": 0.0,
        "moe_layer_type": "pytorch",
        "use_composition_embedding": num_experts > 0,
        "use_global_embedding": False,
        "max_num_elements": 100,
        "sphere_channels": 16,
        "lmax": 2,
        "mmax": 2,
        "otf_graph": True,
        "max_neighbors": 30,
        "use_pbc": True,
        "use_pbc_single": True,
        "cutoff": 6.0,
        "edge_channels": 16,
        "distance_function": "gaussian",
        "num_distance_basis": 32,
        "regress_forces": True,
        "regress_stress": True,
        "direct_forces": False,
        "num_layers": 2,
        "hidden_channels": 16,
        "norm_type": "rms_norm_sh",
        "act_type": "gate",
        "ff_type": "spectral",
        "chg_spin_emb_type": "rand_emb" if num_experts > 0 else "pos_emb",
        "dataset_mapping": mapping,
    }
    if num_experts > 0:
        head = {
            "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
            "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
            "head_kwargs": {"wrap_property": False},
            "dataset_mapping": mapping,
        }
    else:
        head = {
            "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificSingleHeadWrapper",
            "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
            "head_kwargs": {"wrap_property": False},
            "dataset_names": datasets,
        }
    model_config = {
        "_target_": "fairchem.core.models.base.HydraModel",
        "backbone": backbone,
        "heads": {"energyandforcehead": head},
        "pass_through_head_outputs": True,
    }
    if model_id is not None:
        model_config["model_id"] = model_id

    def task(name, level, prop, dim, dataset, refs=None):
        config = {
            "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
            "name": name,
            "level": level,
            "property": prop,
            "out_spec": {"dim": dim, "dtype": "float32"},
            "normalizer": {
                "_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
                "mean": 0.0,
                "rmsd": 1.342,
            },
            "datasets": [dataset],
        }
        if refs is not None:
            config["element_references"] = {
                "_target_": "fairchem.core.modules.normalization.element_references.ElementReferences",
                "element_references": {"_target_": "torch.DoubleTensor", "_args_": [refs]},
            }
        return config

    tasks = []
    for d in datasets:
        refs = np.concatenate([[0.0], -rng.uniform(0.5, 8.0, 99)]).tolist()
        tasks += [
            task(f"{d}_energy", "system", "energy", [1], d, refs),
            task(f"{d}_forces", "atom", "forces", [3], d),
            task(f"{d}_stress", "system", "stress", [1, 9], d),
        ]
    model = hydra.utils.instantiate(OmegaConf.create(model_config))
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save(
        MLIPInferenceCheckpoint(
            model_config=model_config,
            model_state_dict=model.state_dict(),
            ema_state_dict=ema.state_dict(),
            tasks_config=tasks,
        ),
        str(path),
    )
    return str(path)


@pytest.fixture(scope="module")
def esen_checkpoint(tmp_path_factory) -> str:
    return build_small_checkpoint(tmp_path_factory.mktemp("fairchem") / "esen_omat.pt", datasets=("omat",))


@pytest.fixture(scope="module")
def uma_checkpoint(tmp_path_factory) -> str:
    return build_small_checkpoint(
        tmp_path_factory.mktemp("fairchem") / "uma.pt", datasets=UMA_TASKS, num_experts=4,
        model_id="UMA-test-random", seed=1,
    )


@pytest.fixture(scope="module")
def esen(esen_checkpoint) -> FAIRChemBackend:
    return FAIRChemBackend("esen-test", checkpoint=esen_checkpoint, trained=False)


@pytest.fixture(scope="module")
def uma(uma_checkpoint) -> FAIRChemBackend:
    return FAIRChemBackend("uma-test", checkpoint=uma_checkpoint, task="omat", trained=False)


def _calculator(checkpoint: str, task: str):
    """fairchem's own ASE calculator on a separately loaded predict unit."""
    from fairchem.core import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    return FAIRChemCalculator(load_predict_unit(checkpoint, inference_settings="batch", device="cpu"), task_name=task)


@pytest.fixture(scope="module")
def esen_calc(esen_checkpoint):
    return _calculator(esen_checkpoint, "omat")


@pytest.fixture(scope="module")
def uma_calcs(uma_checkpoint):
    from fairchem.core import FAIRChemCalculator

    calc = _calculator(uma_checkpoint, "omat")
    return {task: FAIRChemCalculator(calc.predictor, task_name=task) for task in UMA_TASKS}


# --- structures ------------------------------------------------------------------------------------


def cu_bulk():
    """Cu fcc, 2x2x2 conventional (32 atoms), rattled and strained: non-zero forces and stress."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(stdev=0.05, seed=1)
    atoms.set_cell(atoms.cell.array @ np.array([[1.01, 0.02, 0], [0, 0.99, 0], [0, 0, 1.0]]), scale_atoms=True)
    return atoms


def pt_slab():
    """Pt(111), 2x2x3, 8 Å vacuum, periodic in-plane only."""
    atoms = fcc111("Pt", size=(2, 2, 3), vacuum=8.0)
    atoms.rattle(stdev=0.05, seed=2)
    return atoms


def ethanol():
    """Isolated ethanol: no cell, no PBC."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(stdev=0.02, seed=3)
    return atoms


def nacl_bulk():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(stdev=0.05, seed=4)
    return atoms


STRUCTURES = {"bulk": cu_bulk, "slab": pt_slab, "molecule": ethanol}


def assert_matches_calculator(result, atoms, calc):
    atoms = atoms.copy()
    atoms.info = dict(atoms.info)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert abs(result.energy - energy) <= e_tol(energy)
    np.testing.assert_allclose(result.forces, atoms.get_forces(), atol=F_TOL, rtol=0)
    if atoms.pbc.any():
        np.testing.assert_allclose(result.stress, atoms.get_stress(), atol=S_TOL, rtol=0)
    else:
        assert result.stress is None  # no cell, no stress


# --- tests -----------------------------------------------------------------------------------------


def test_esen_info(esen):
    assert isinstance(esen, Backend)
    info = esen.info
    assert (info.architecture, info.cutoff, info.dtype, info.device) == ("eSEN", 6.0, "float32", "cpu")
    assert info.tasks == ("omat",) and info.default_task == "omat"
    assert info.properties == EFS and info.trained is False
    assert not info.uses_total_charge and not info.uses_spin
    assert info.elements == tuple(range(1, 100)) and info.num_parameters > 0


def test_uma_info(uma):
    info = uma.info
    assert info.architecture == "UMA" and info.version == "UMA-test-random"
    assert set(info.tasks) == set(UMA_TASKS) and info.default_task == "omat"
    assert info.uses_total_charge and info.uses_spin and info.properties == EFS


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_esen_equals_fairchem_calculator(esen, esen_calc, kind):
    atoms = STRUCTURES[kind]()
    (result,) = esen.compute(Batch((system_from_atoms(atoms),), EFS))
    assert_matches_calculator(result, atoms, esen_calc)


def test_esen_mixed_batch_equals_fairchem_calculator(esen, esen_calc):
    structures = [cu_bulk(), pt_slab(), ethanol(), nacl_bulk(), ethanol()[:4]]
    results = esen.compute(Batch(tuple(system_from_atoms(a) for a in structures), EFS))
    assert len(results) == len(structures)
    for atoms, result in zip(structures, results, strict=True):
        assert_matches_calculator(result, atoms, esen_calc)


@pytest.mark.parametrize("task", UMA_TASKS)
def test_uma_mixed_batch_equals_fairchem_calculator_per_task(uma, uma_calcs, task):
    structures = [cu_bulk(), pt_slab(), ethanol()]
    results = uma.compute(Batch(tuple(system_from_atoms(a) for a in structures), EFS, task=task))
    for atoms, result in zip(structures, results, strict=True):
        assert_matches_calculator(result, atoms, uma_calcs[task])


def test_uma_omol_charge_and_spin_in_one_batch(uma, uma_calcs):
    """atoms.info["charge"] / ["spin"] (fairchem's convention) travel as total_charge and
    spin_multiplicity; systems of different charge and spin share one forward pass."""
    structures = []
    for charge, spin in [(0, 1), (1, 2), (-1, 2), (0, 3), (0, None)]:
        atoms = ethanol()
        atoms.info["charge"] = charge
        if spin is not None:
            atoms.info["spin"] = spin
        structures.append(atoms)
    results = uma.compute(Batch(tuple(system_from_atoms(a) for a in structures), EFS, task="omol"))
    for atoms, result in zip(structures, results, strict=True):
        assert_matches_calculator(result, atoms, uma_calcs["omol"])
    energies = [r.energy for r in results]
    assert len({round(e, 6) for e in energies[:4]}) == 4  # charge and spin change the answer
    assert energies[4] == pytest.approx(energies[0], abs=1e-5)  # spin 0 = fairchem's default, 1


def test_batch_equals_one_by_one(uma):
    systems = [system_from_atoms(a) for a in (cu_bulk(), pt_slab(), ethanol(), nacl_bulk())]
    batched = uma.compute(Batch(tuple(systems), EFS))
    for system, merged in zip(systems, batched, strict=True):
        (alone,) = uma.compute(Batch((system,), EFS))
        assert merged.energy == pytest.approx(alone.energy, abs=e_tol(alone.energy))
        np.testing.assert_allclose(merged.forces, alone.forces, atol=F_TOL, rtol=0)
        if alone.stress is None:
            assert merged.stress is None
        else:
            np.testing.assert_allclose(merged.stress, alone.stress, atol=S_TOL, rtol=0)


def test_only_requested_properties(esen):
    (result,) = esen.compute(Batch((system_from_atoms(cu_bulk()),), frozenset({Property.ENERGY})))
    assert result.energy is not None
    assert result.forces is None and result.stress is None and result.energies is None and result.magmoms is None


def test_stress_is_ase_sign_by_finite_differences(esen_checkpoint):
    """σ = (1/V) ∂E/∂ε (ASE's sign), in float64 so that differences of energies are meaningful; all
    twelve strained cells in one batch."""
    backend = FAIRChemBackend("esen-f64", checkpoint=esen_checkpoint, dtype="float64", trained=False)
    atoms = nacl_bulk()
    (result,) = backend.compute(Batch((system_from_atoms(atoms),), EFS))
    volume, h = atoms.get_volume(), 1e-4
    strained = []
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            strained.append(system_from_atoms(a))
    energies = [r.energy for r in backend.compute(Batch(tuple(strained), frozenset({Property.ENERGY})))]
    fd = (np.array(energies[0::2]) - np.array(energies[1::2])) / (2 * h) / volume
    np.testing.assert_allclose(result.stress, fd, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_translations_by_whole_cells_change_nothing(esen, kind):
    """Atoms far outside their cell (unwrapped MD) get the answer of the wrapped structure."""
    base = STRUCTURES[kind]()
    moved = base.copy()
    if kind == "bulk":
        moved.positions[3] += 200 * moved.cell[0] - 150 * moved.cell[2]
    elif kind == "slab":
        moved.positions[3] += 200 * moved.cell[1]
        moved.positions[:, 2] += 700.0
    else:
        moved.positions += 800.0
    (r0,), (r1,) = (esen.compute(Batch((system_from_atoms(a),), EFS)) for a in (base, moved))
    assert r1.energy == pytest.approx(r0.energy, abs=e_tol(r0.energy))
    np.testing.assert_allclose(r1.forces, r0.forces, atol=F_TOL, rtol=0)
    if r0.stress is not None:
        np.testing.assert_allclose(r1.stress, r0.stress, atol=S_TOL, rtol=0)


def test_task_errors(uma_checkpoint, uma):
    system = system_from_atoms(ethanol())
    with pytest.raises(InvalidSystemError, match="no task 'omx'"):
        uma.compute(Batch((system,), EFS, task="omx"))
    no_default = FAIRChemBackend("uma-no-default", checkpoint=uma_checkpoint, trained=False)
    assert no_default.info.default_task == ""
    with pytest.raises(InvalidSystemError, match="name one"):
        no_default.compute(Batch((system,), EFS))
    with pytest.raises(ValueError, match="no task 'omx'"):
        FAIRChemBackend("x", checkpoint=uma_checkpoint, task="omx")
    with pytest.raises(ValueError, match="presets"):
        FAIRChemBackend("x", checkpoint=uma_checkpoint, inference_settings="turbo")


def test_charge_and_spin_errors(uma):
    charged = ethanol()
    charged.info["charge"] = 1
    with pytest.raises(InvalidSystemError, match=r"systems\[1\]\.total_charge.*neutral.*'omol'"):
        uma.compute(Batch((system_from_atoms(ethanol()), system_from_atoms(charged)), EFS, task="omat"))
    triplet = ethanol()
    triplet.info["spin"] = 3
    with pytest.raises(InvalidSystemError, match=r"spin_multiplicity"):
        uma.compute(Batch((system_from_atoms(triplet),), EFS, task="oc20"))
    half = ethanol()
    half.info["charge"] = 0.5
    with pytest.raises(InvalidSystemError, match="integer"):
        uma.compute(Batch((system_from_atoms(half),), EFS, task="omol"))
    # A singlet named explicitly is fine on a task without spin input (it means "no spin").
    singlet = ethanol()
    singlet.info["spin"] = 1
    (r1,), (r0,) = (uma.compute(Batch((system_from_atoms(a),), EFS, task="omat")) for a in (singlet, ethanol()))
    assert r1.energy == pytest.approx(r0.energy, abs=1e-6)  # same input; CPU float32 sums vary by ~1e-8


def test_lone_atom(esen_checkpoint, esen):
    """fairchem computes an isolated atom from reference energies only, alone in its batch: without
    references that is a clear input error; with them it works inside a mixed batch."""
    atom = molecule("H")
    with pytest.raises(InvalidSystemError, match=r"systems\[1\].*atom_refs"):
        esen.compute(Batch((system_from_atoms(ethanol()), system_from_atoms(atom)), EFS))
    with_refs = FAIRChemBackend("esen-refs", checkpoint=esen_checkpoint, atom_refs={"omat": {1: -0.5}}, trained=False)
    _, atom_result, mol_result = with_refs.compute(
        Batch(tuple(system_from_atoms(a) for a in (cu_bulk(), atom, ethanol())), EFS)
    )
    assert atom_result.energy == pytest.approx(-0.5)
    np.testing.assert_array_equal(atom_result.forces, np.zeros((1, 3)))
    assert atom_result.stress is None
    (alone,) = esen.compute(Batch((system_from_atoms(ethanol()),), EFS))
    assert mol_result.energy == pytest.approx(alone.energy, abs=e_tol(alone.energy))

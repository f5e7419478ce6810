"""Families that need their own environment, served for real: Ray Serve replicas in a Ray runtime_env
(fairchem-core with e3nn >= 0.5; sevenn 0.13 for SevenNet-MF-0), equal to the package's own ASE
calculator evaluated in that same environment (a Ray task), for a crystal, a slab and a molecule,
alone and in one mixed request.

Opt-in, and run on its own: the environments are built from the package index the first time
(fairchem-core ~2-3 min and ~2.8 GB), too slow and network-bound for every CI run, and this file
starts its own local Ray (the main suite's session server holds one per process):

    MLIPSERVE_RUNTIME_ENV_TESTS=1 python -m pytest tests/test_served_runtime_envs.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from mlipserve.config import ServiceConfig
from mlipserve_client import MLIPClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MLIPSERVE_RUNTIME_ENV_TESTS") != "1",
                       reason="opt-in: MLIPSERVE_RUNTIME_ENV_TESTS=1 (builds Ray runtime_envs from the index)"),
]

TESTS = Path(__file__).resolve().parent
FAIRCHEM_ENV = {"pip": {"packages": ["fairchem-core==2.24.0"], "pip_check": False}}
EFS = ["energy", "forces", "stress"]


def structures() -> dict:
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    cu.rattle(stdev=0.05, seed=1)
    cu.set_cell(cu.cell.array @ np.array([[1.01, 0.02, 0], [0, 0.99, 0], [0, 0, 1.0]]), scale_atoms=True)
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=8.0)
    slab.rattle(stdev=0.05, seed=2)
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(stdev=0.02, seed=3)
    return {"bulk": cu, "slab": slab, "molecule": ethanol}


def _fairchem_references(directory: str) -> tuple[str, dict]:
    """In fairchem's environment: a small random eSEN checkpoint from fairchem's own model config
    (test_backend_fairchem's builder) and FAIRChemCalculator's answers for structures()."""
    sys.path.insert(0, str(TESTS))
    from test_backend_fairchem import _calculator, build_small_checkpoint

    path = build_small_checkpoint(Path(directory) / "esen_omat.pt", datasets=("omat",))
    return path, _evaluate(_calculator(path, "omat"))


def _sevennet_mf_references(modal: str) -> dict:
    from sevenn.calculator import SevenNetCalculator

    return _evaluate(SevenNetCalculator(model="7net-mf-0", modal=modal, device="cpu"))


def _evaluate(calc) -> dict:
    out = {}
    for name, atoms in structures().items():
        atoms.calc = calc
        out[name] = (atoms.get_potential_energy(), atoms.get_forces(),
                     atoms.get_stress() if atoms.pbc.all() else None)
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from mlipserve import runtime

    if ray.is_initialized():
        pytest.skip("run this file on its own: the main suite's server already holds this process's Ray")
    # The reference functions run in Ray tasks whose workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    port = runtime.free_port()
    runtime.start_ray(num_cpus=4)
    runtime.start_serve(grpc_port=port)
    yield f"localhost:{port}"
    runtime.stop_local()


def _assert_served_equals(client: MLIPClient, model: str, references: dict, tolerances, task: str = "") -> None:
    e_tol, f_tol, s_tol = tolerances
    atoms = structures()
    mixed = client.compute(list(atoms.values()), EFS, model=model, task=task)
    for (name, system), together in zip(atoms.items(), mixed, strict=True):
        (alone,) = client.compute(system, EFS, model=model, task=task)
        energy, forces, stress = references[name]
        for served in (alone, together):
            assert served.energy == pytest.approx(energy, abs=e_tol), name
            np.testing.assert_allclose(served.forces, forces, atol=f_tol, rtol=0, err_msg=name)
            if stress is not None:
                np.testing.assert_allclose(served.stress, stress, atol=s_tol, rtol=0, err_msg=name)


def test_fairchem_esen_served_in_its_runtime_env(local_ray, tmp_path):
    import ray

    from mlipserve import runtime

    checkpoint, references = ray.get(
        ray.remote(runtime_env=FAIRCHEM_ENV)(_fairchem_references).remote(str(tmp_path)), timeout=900)
    runtime.deploy(ServiceConfig.from_dict({
        "models": [{"id": "esen-random", "backend": "fairchem",
                    "options": {"checkpoint": checkpoint, "task": "omat", "trained": False}}],
        "deployments": {"fairchem": {"num_cpus": 1, "runtime_env": FAIRCHEM_ENV}},
    }))
    with MLIPClient(local_ray, model="esen-random", timeout=600) as client:
        info = client.get_model("esen-random")
        assert (info.architecture, info.trained) == ("eSEN", False)
        _assert_served_equals(client, "esen-random", references, (1e-5, 1e-5, 1e-6))


def test_sevennet_mf_served_in_its_runtime_env(local_ray):
    import ray

    from mlipserve import runtime

    catalog = ServiceConfig.catalog().select(["sevennet-mf-0"])
    env = dict(catalog.deployment("sevennet-mf").runtime_env)
    references = {modal: ray.get(ray.remote(runtime_env=env)(_sevennet_mf_references).remote(modal), timeout=900)
                  for modal in ("PBE", "R2SCAN")}
    runtime.deploy(catalog)
    with MLIPClient(local_ray, model="sevennet-mf-0", timeout=600) as client:
        for modal, found in references.items():
            _assert_served_equals(client, "sevennet-mf-0", found, (1e-3, 1e-4, 1e-5), task=modal)

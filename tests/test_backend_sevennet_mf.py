"""SevenNet multi-fidelity backend (sevenn >= 0.11): SevenNet-MF-0's modalities are the model's tasks,
picked per request. Equal to SevenNet's own ASE calculator (``SevenNetCalculator("7net-mf-0",
modal=...)``) for a crystal, a slab, a molecule and a batch mixing them, at two modalities whose
energies differ; unknown modalities are refused.

sevenn >= 0.11 needs e3nn >= 0.5, which mace-torch 0.3.16 (e3nn 0.4.4) excludes from the main
environment, so this file is skipped there; it runs in an environment with sevenn >= 0.11 (the
SevenNet-MF runtime_env, or a development venv). Systems stay small (<= 12 atoms each).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest

from mlipserve.backends.sevennet import _has_multi_fidelity

try:
    SEVENN_VERSION = version("sevenn")
except PackageNotFoundError:
    pytest.skip("sevenn is not installed", allow_module_level=True)
if not _has_multi_fidelity(SEVENN_VERSION):
    pytest.skip(
        f"multi-fidelity SevenNet needs sevenn >= 0.11 (e3nn >= 0.5, its own environment); "
        f"this environment has sevenn {SEVENN_VERSION}",
        allow_module_level=True,
    )

from test_backend_sevennet import STRUCTURES  # noqa: E402  (the same bulk, slab and molecule)

from mlipserve.backends.base import Backend, Batch, check_request  # noqa: E402
from mlipserve.backends.sevennet import SevenNetBackend  # noqa: E402
from mlipserve.errors import InvalidSystemError  # noqa: E402
from mlipserve_client.convert import system_from_atoms  # noqa: E402
from mlipserve_client.types import Property  # noqa: E402

pytestmark = [
    # sevenn >= 0.12's SevenNetCalculator warns that no cuEquivariance/FlashTP/OEQ accelerator is on.
    pytest.mark.filterwarnings("ignore:No tensor product accelerator is enabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations"),
]

ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES})
# float32 model: the fixtures README's float32 tolerances (per-atom energies as forces).
E_ABS, E_REL, F_TOL, S_TOL = 1e-3, 1e-6, 1e-4, 1e-5
MODALITIES = ("PBE", "R2SCAN")


@cache
def _backend() -> SevenNetBackend:
    return SevenNetBackend(model_id="sevennet-mf-0", checkpoint="7net-mf-0")


@cache
def _calculator(modal: str):
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(model="7net-mf-0", modal=modal, device="cpu")


@cache
def _reference(kind: str, modal: str) -> dict:
    atoms = STRUCTURES[kind]()
    atoms.calc = _calculator(modal)
    # Optimised TorchScript, as the backend runs: with e3nn >= 0.5 a new input shape costs ~0.1 s
    # here, while switching optimized_execution on and off between the backend's and the calculator's
    # calls made each call re-profile (10-30 s).
    atoms.calc.calculate(atoms)
    return dict(atoms.calc.results)


def _assert_equals_calculator(result, kind: str, modal: str) -> None:
    reference = _reference(kind, modal)
    assert abs(result.energy - reference["energy"]) <= E_ABS + E_REL * abs(reference["energy"])
    np.testing.assert_allclose(result.forces, reference["forces"], atol=F_TOL, rtol=0)
    np.testing.assert_allclose(result.energies, reference["energies"], atol=F_TOL, rtol=0)
    if kind == "molecule":
        assert result.stress is None  # SevenNet's own number divides by a zero volume
    else:
        np.testing.assert_allclose(result.stress, reference["stress"], atol=S_TOL, rtol=0)


def _systems(kinds):
    return tuple(system_from_atoms(STRUCTURES[kind]()) for kind in kinds)


@pytest.mark.parametrize("modal", MODALITIES)
@pytest.mark.parametrize("kind", STRUCTURES)
def test_single_system_equals_sevennet_calculator(kind, modal):
    (result,) = _backend().compute(Batch(_systems([kind]), ALL, task=modal))
    _assert_equals_calculator(result, kind, modal)


@pytest.mark.parametrize("modal", MODALITIES)
def test_mixed_batch_equals_sevennet_calculator(modal):
    kinds = ["bulk", "molecule", "slab"]
    results = _backend().compute(Batch(_systems(kinds), ALL, task=modal))
    assert len(results) == len(kinds)
    for kind, result in zip(kinds, results, strict=True):
        _assert_equals_calculator(result, kind, modal)


def test_modalities_differ_and_pbe_is_the_default():
    systems = _systems(STRUCTURES)
    by_modal = {m: _backend().compute(Batch(systems, ALL, task=m)) for m in MODALITIES}
    default = _backend().compute(Batch(systems, ALL))
    for k in range(len(systems)):
        # r2SCAN and PBE total energies differ by eV per structure, far beyond the tolerance.
        assert abs(by_modal["PBE"][k].energy - by_modal["R2SCAN"][k].energy) > 1.0
        # The same inputs and weights; TorchScript's re-optimised kernels may differ in the last bits.
        assert abs(default[k].energy - by_modal["PBE"][k].energy) <= 1e-5
        np.testing.assert_allclose(default[k].forces, by_modal["PBE"][k].forces, atol=1e-6, rtol=0)


def test_info():
    backend = _backend()
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.architecture, info.cutoff, info.dtype, info.trained) == ("SevenNet", 5.0, "float32", True)
    assert info.tasks == ("R2SCAN", "PBE") and info.default_task == "PBE"
    assert info.version.startswith("SevenNet-MF-0 (16Dec2024)") and "r2SCAN" in info.training_data
    assert len(info.elements) == 89 and info.num_parameters == 846_168
    assert info.license.startswith("GPL-3.0")


@pytest.mark.parametrize("task", ["SCAN", "pbe", "omat24"])
def test_unknown_modality_is_refused(task):
    info, systems = _backend().info, _systems(["molecule"])
    with pytest.raises(InvalidSystemError, match=f"no task '{task}'") as err:
        check_request(info, systems, ALL, task=task)  # the service's check, before the model
    assert err.value.field == "task"
    with pytest.raises(InvalidSystemError, match=f"no task '{task}'.*R2SCAN, PBE") as err:
        _backend().compute(Batch(systems, ALL, task=task))
    assert err.value.field == "task"


def test_modal_option_sets_the_default_task():
    # The option matches case-insensitively, as sevenn documents; requests naming no task get it.
    backend = SevenNetBackend(model_id="mf-r2scan", checkpoint="7net-mf-0", modal="r2scan")
    assert backend.info.default_task == "R2SCAN" and backend.info.tasks == ("R2SCAN", "PBE")
    (result,) = backend.compute(Batch(_systems(["bulk"]), ALL))
    _assert_equals_calculator(result, "bulk", "R2SCAN")


@pytest.mark.parametrize(("options", "match"), [
    ({"checkpoint": "7net-mf-0", "modal": "HSE"}, "no modal 'HSE'; its modalities are R2SCAN, PBE"),
    ({"checkpoint": "7net-mf-ompa"}, "not shipped in the sevenn"),
    ({"checkpoint": "no-such-model"}, "unknown SevenNet checkpoint .*7net-mf-0"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        SevenNetBackend(model_id="bad", **options)

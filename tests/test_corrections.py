"""Corrections composed with a model (in-process): what the ingress resolves and rejects, and what
the replica adds, against the physics modules called directly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from mlipserve.backends.base import Batch
from mlipserve.backends.chgnet import CHGNetBackend
from mlipserve.corrections import resolve_corrections
from mlipserve.errors import InvalidSystemError
from mlipserve.physics.corrected import CorrectedEvaluator, build_correction
from mlipserve_client.convert import system_from_atoms
from mlipserve_client.types import Dispersion, Electrostatics, Property

ALL = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS})


def _nacl(charged=True):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=1)
    if charged:
        atoms.set_initial_charges([0.8 if z == 11 else -0.8 for z in atoms.numbers])
    return system_from_atoms(atoms)


@pytest.fixture(scope="module")
def backend():
    return CHGNetBackend()


# --- resolution (the ingress) -----------------------------------------------------------------------


def test_auto_charges_resolve_to_the_first_available_source(backend):
    info = backend.info
    with_charges, without = _nacl(), _nacl(charged=False)
    (spec,) = resolve_corrections(info, (Electrostatics(),), [with_charges])
    assert spec.charges == "request"
    (spec,) = resolve_corrections(info, (Electrostatics(),), [with_charges, without])
    assert spec.charges == "qeq"  # CHGNet predicts no charges
    with_model_charges = dataclasses.replace(info, properties=info.properties | {Property.CHARGES})
    assert resolve_corrections(with_model_charges, (Electrostatics(),), [without])[0].charges == "model"


@pytest.mark.parametrize(("corrections", "systems", "field", "words"), [
    ((Electrostatics(charges="request"),), lambda: [_nacl(), _nacl(False)], "systems[1].atomic_charges", "charge per atom"),
    ((Electrostatics(charges="model"),), lambda: [_nacl()], "corrections[0].electrostatics.charges", "does not predict"),
    ((Electrostatics(method="pme"),), lambda: [system_from_atoms(molecule("H2O"))], "corrections[0].electrostatics.method",
     "needs a periodic system"),
    ((Electrostatics(method="direct"),), lambda: [_nacl()], "corrections[0].electrostatics.method", "diverges"),
    ((Electrostatics(),), lambda: [system_from_atoms(fcc111("Cu", (2, 2, 3), vacuum=5))], "systems[0].pbc", "slabs"),
    ((Dispersion(), Dispersion("r2scan")), lambda: [_nacl()], "corrections[1]", "already applied"),
])
def test_bad_corrections_are_named(backend, corrections, systems, field, words):
    with pytest.raises(InvalidSystemError) as error:
        resolve_corrections(backend.info, corrections, systems())
    assert error.value.field == field and words in str(error.value)


def test_model_corrections_come_first_and_are_not_repeated(backend):
    composite = dataclasses.replace(backend.info, corrections=(Dispersion(),))
    assert resolve_corrections(composite, (Electrostatics(charges="request"),), [_nacl()]) == (
        Dispersion(), Electrostatics(charges="request"))
    with pytest.raises(InvalidSystemError, match="already applied .* by model"):
        resolve_corrections(composite, (Dispersion("pbe0"),), [_nacl()])


# --- composition (the replica) ----------------------------------------------------------------------


def test_corrections_add_to_the_model(backend):
    systems = (_nacl(), system_from_atoms(molecule("CH3CH2OH")))
    corrections = (Electrostatics(charges="request"), Dispersion())
    systems = (systems[0], dataclasses.replace(systems[1], atomic_charges=np.zeros(9)))
    evaluate = CorrectedEvaluator(backend.compute, backend.info, "cpu")
    corrected = evaluate(Batch(systems, ALL, corrections=corrections))
    plain = backend.compute(Batch(systems, ALL))
    terms = [build_correction(c, backend.info.cutoff, "cpu").compute(Batch(systems, ALL)) for c in corrections]
    for k, (got, model) in enumerate(zip(corrected, plain, strict=True)):
        energies = {c.name: t[k].energy for c, t in zip(corrections, terms, strict=True)}
        assert got.corrections == pytest.approx(energies)
        assert got.energy == pytest.approx(model.energy + sum(energies.values()), abs=1e-9)
        np.testing.assert_allclose(got.forces, model.forces + sum(t[k].forces for t in terms), atol=1e-9)
        if model.stress is None:
            assert got.stress is None
        else:
            np.testing.assert_allclose(got.stress, model.stress + sum(t[k].stress for t in terms), atol=1e-12)
    assert corrected[0].corrections["electrostatics(auto, request)"] < 0  # opposite charges attract
    np.testing.assert_allclose(corrected[0].charges, systems[0].atomic_charges)


def test_mixed_batch_with_corrections_equals_one_by_one(backend):
    systems = (_nacl(), system_from_atoms(bulk("Si", cubic=True)), system_from_atoms(molecule("H2O")),
               system_from_atoms(bulk("Cu", cubic=True) * (2, 1, 1)))
    corrections = (Electrostatics(charges="qeq"), Dispersion())
    evaluate = CorrectedEvaluator(backend.compute, backend.info, "cpu")
    together = evaluate(Batch(systems, ALL, corrections=corrections))
    for system, merged in zip(systems, together, strict=True):
        (alone,) = evaluate(Batch((system,), ALL, corrections=corrections))
        assert merged.energy == pytest.approx(alone.energy, abs=1e-4)
        assert merged.corrections == pytest.approx(alone.corrections, abs=1e-8)
        np.testing.assert_allclose(merged.forces, alone.forces, atol=1e-4)
        np.testing.assert_allclose(merged.charges, alone.charges, atol=1e-8)

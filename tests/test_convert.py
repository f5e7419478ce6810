"""The one conversion Atoms <-> System <-> proto: exact round trips and field-named validation."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from mlipserve_client import convert
from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import ComputeRequest, ModelInfo, ModelStatus, Property, Result
from mlipserve_client.v1 import compute_pb2, models_pb2, system_pb2


@pytest.mark.parametrize("atoms", [
    bulk("Si", cubic=True),
    fcc111("Cu", size=(2, 2, 3), vacuum=6.0),
    molecule("CH3CH2OH"),
], ids=["bulk", "slab", "molecule"])
def test_atoms_round_trip_is_exact(atoms):
    atoms.info["charge"] = -1.0
    atoms.info["spin"] = 2
    charges = np.linspace(-1, 1, len(atoms))
    atoms.set_initial_charges(charges - (charges.sum() + 1.0) / len(atoms))
    system = convert.system_from_atoms(atoms)
    wire = system_pb2.System.FromString(convert.system_to_proto(system).SerializeToString())
    back = convert.atoms_from_system(convert.system_from_proto(wire))
    np.testing.assert_array_equal(back.numbers, atoms.numbers)
    np.testing.assert_array_equal(back.positions, atoms.positions)
    np.testing.assert_array_equal(back.cell.array, atoms.cell.array)
    np.testing.assert_array_equal(back.pbc, atoms.pbc)
    np.testing.assert_array_equal(back.get_initial_charges(), atoms.get_initial_charges())
    assert back.info == {"charge": -1.0, "spin": 2}


def test_molecule_without_cell_travels_without_cell():
    system = convert.system_from_atoms(molecule("H2O"))
    assert system.cell is None and not system.is_periodic and system.atomic_charges is None
    assert len(convert.system_to_proto(system).cell) == 0


def test_result_round_trip():
    result = Result(energy=-1.5, forces=np.arange(6.0).reshape(2, 3), stress=np.arange(6.0) / 7,
                    energies=np.array([-1.0, -0.5]), magmoms=np.array([0.25, 2.0]), charges=np.array([0.5, -0.5]),
                    corrections={"d3(bj)-pbe": -0.25, "electrostatics(pme, qeq)": -1.0})
    wire = compute_pb2.SystemResult.FromString(convert.result_to_proto(result).SerializeToString())
    back = convert.result_from_proto(wire, n_atoms=2)
    assert back.energy == -1.5
    np.testing.assert_array_equal(back.forces, result.forces)
    np.testing.assert_array_equal(back.stress, result.stress)
    np.testing.assert_array_equal(back.energies, result.energies)
    np.testing.assert_array_equal(back.magmoms, result.magmoms)
    np.testing.assert_array_equal(back.charges, result.charges)
    assert list(back.corrections.items()) == list(result.corrections.items())
    assert convert.result_from_proto(compute_pb2.SystemResult(), n_atoms=2).energy is None


def test_request_round_trip_and_default_properties():
    atoms = bulk("Si")
    request = ComputeRequest("m", (convert.system_from_atoms(atoms),), frozenset({Property.STRESS, Property.MAGMOMS}), "PBE")
    back = convert.compute_request_from_proto(convert.compute_request_to_proto(request))
    assert (back.model, back.properties, back.task) == ("m", request.properties, "PBE")
    message = convert.compute_request_to_proto(request)
    del message.properties[:]
    assert convert.compute_request_from_proto(message).properties == {Property.ENERGY, Property.FORCES}


def test_corrections_round_trip_and_defaults():
    from mlipserve_client.types import Dispersion, Electrostatics

    corrections = (Electrostatics("pme", "qeq", 4.5), Dispersion("r2scan", "zero", 30.0), Electrostatics(), Dispersion())
    request = ComputeRequest("m", (convert.system_from_atoms(bulk("Si")),), corrections=corrections)
    back = convert.compute_request_from_proto(
        compute_pb2.ComputeRequest.FromString(convert.compute_request_to_proto(request).SerializeToString()))
    assert back.corrections == corrections
    assert [c.name for c in back.corrections] == ["electrostatics(pme, qeq)", "d3(zero)-r2scan",
                                                  "electrostatics(auto, auto)", "d3(bj)-pbe"]
    empty = compute_pb2.Correction(dispersion=compute_pb2.Dispersion())
    assert convert.correction_from_proto(empty, "c") == Dispersion("pbe", "bj", None)
    with pytest.raises(InvalidSystemError, match=r"corrections\[0\].electrostatics.exclusion_radius"):
        bad = compute_pb2.Correction(electrostatics=compute_pb2.Electrostatics(exclusion_radius=-1))
        convert.correction_from_proto(bad, "corrections[0]")
    with pytest.raises(InvalidSystemError, match="electrostatics or dispersion"):
        convert.correction_from_proto(compute_pb2.Correction(), "corrections[2]")


def test_model_info_round_trip():
    info = ModelInfo(id="x", architecture="CHGNet", version="0.3.0", cutoff=6.0, elements=(1, 8), num_parameters=5,
                     properties=frozenset(Property), status=ModelStatus.LOADING, status_message="warming up",
                     tasks=("omat", "omol"), default_task="omat",
                     corrections=(convert.Electrostatics(), convert.Dispersion()))
    assert convert.model_info_from_proto(
        models_pb2.ModelInfo.FromString(convert.model_info_to_proto(info).SerializeToString())) == info


def _si_message() -> system_pb2.System:
    return convert.system_to_proto(convert.system_from_atoms(bulk("Si", cubic=True)))


def _mutated(**changes) -> system_pb2.System:
    message = _si_message()
    for name, value in changes.items():
        field = getattr(message, name)
        if hasattr(field, "extend"):
            del field[:]
            field.extend(value)
        else:
            setattr(message, name, value)
    return message


NAN = float("nan")


@pytest.mark.parametrize(("message", "field", "words"), [
    (_mutated(positions=[0.0] * 23), "systems[3].positions", "24"),
    (_mutated(atomic_numbers=[]), "systems[3].atomic_numbers", "no atoms"),
    (_mutated(atomic_numbers=[14] * 7 + [0]), "systems[3].atomic_numbers[7]", "atomic number 0"),
    (_mutated(atomic_numbers=[119] + [14] * 7), "systems[3].atomic_numbers[0]", "119"),
    (_mutated(positions=[0.0] * 15 + [NAN, 0.0, 0.0] + [1.0] * 6), "systems[3].positions[5]", "non-finite"),
    (_mutated(positions=[0.0] * 21 + [float("inf"), 0, 0]), "systems[3].positions[7]", "non-finite"),
    (_mutated(positions=[0.0] * 6 + [0.0, -3e200, 0.0] + [1.0] * 15), "systems[3].positions[2]", "beyond ±1e+06 Å"),
    (_mutated(cell=[5.43, 0, 0, 0, NAN, 0, 0, 0, 5.43]), "systems[3].cell", "vector b"),
    (_mutated(cell=[5.43, 0, 0, 0, 5.43, 0, 0, 0, 1e300]), "systems[3].cell", "vector c [0.0, 0.0, 1e+300] Å"),
    (_mutated(cell=[5.0, 0, 0, 0, 5.0, 0, 5.0, 5.0, 0]), "systems[3].cell", "singular"),
    (_mutated(cell=[1.0] * 4), "systems[3].cell", "4 values"),
    (_mutated(cell=[]), "systems[3].cell", "no cell"),
    (_mutated(pbc=[True, True]), "systems[3].pbc", "2 values"),
    (_mutated(total_charge=NAN), "systems[3].total_charge", "not finite"),
    (_mutated(atomic_charges=[0.1] * 7), "systems[3].atomic_charges", "one per atom (8)"),
    (_mutated(atomic_charges=[0.1] * 8), "systems[3].atomic_charges", "sum to 0.8 e but total_charge is 0 e"),
    (_mutated(atomic_charges=[0.0] * 4 + [NAN] + [0.0] * 3), "systems[3].atomic_charges[4]", "non-finite"),
])
def test_invalid_systems_name_the_field(message, field, words):
    with pytest.raises(InvalidSystemError) as info:
        convert.system_from_proto(message, where="systems[3]")
    assert info.value.field == field
    assert words in str(info.value)


def test_singular_cell_is_fine_without_pbc():
    system = convert.system_from_proto(_mutated(cell=[0.0] * 9, pbc=[False] * 3))
    assert system.cell is not None and not system.is_periodic


def test_request_without_model_or_systems():
    with pytest.raises(InvalidSystemError, match="model"):
        convert.compute_request_from_proto(compute_pb2.ComputeRequest(systems=[_si_message()]))
    with pytest.raises(InvalidSystemError, match="no systems"):
        convert.compute_request_from_proto(compute_pb2.ComputeRequest(model="m"))
    with pytest.raises(InvalidSystemError, match=r"properties\[1\]: unknown property 42"):
        convert.compute_request_from_proto(
            compute_pb2.ComputeRequest(model="m", systems=[_si_message()], properties=[1, 42]))


def test_invalid_system_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(InvalidSystemError("systems[0].cell", "bad")))
    assert (error.field, error.message) == ("systems[0].cell", "bad")


def test_partial_cell_molecule_counts_as_no_cell():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[10.0, 0, 0])
    assert convert.system_from_atoms(atoms).cell is None

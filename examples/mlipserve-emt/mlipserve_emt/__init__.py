"""An mlipserve backend for ASE's EMT potential: the smallest complete backend plugin.

EMT is an ASE calculator that evaluates one system at a time, so ``compute`` loops over the batch;
a machine-learned model would merge the batch into one graph instead (see mlipserve's MACE backend).
"""

from __future__ import annotations

from math import sqrt

from ase.calculators.emt import EMT, beta, parameters
from ase.data import atomic_numbers
from ase.units import Bohr

from mlipserve.backends.base import Batch
from mlipserve.geometry import wrapped_positions
from mlipserve_client.convert import atoms_from_system
from mlipserve_client.types import ModelInfo, Property, Result

_ELEMENTS = tuple(sorted(atomic_numbers[symbol] for symbol in parameters))
# EMT's neighbour-search radius (ase.calculators.emt.EMT._calc_cutoff, asap_cutoff=False).
_CUTOFF = beta * max(p[1] for p in parameters.values()) * Bohr * 0.5 * (sqrt(3.0) + 2.0) + 0.5


class EMTBackend:
    """Effective-medium theory (ASE's EMT). Options: none."""

    def __init__(self, model_id: str = "emt", device: str = "cpu") -> None:
        if device != "cpu":
            raise ValueError("EMT runs on the CPU only")
        self._calc = EMT()
        self._info = ModelInfo(
            id=model_id,
            architecture="EMT",
            version="ase",
            cutoff=_CUTOFF,
            elements=_ELEMENTS,
            dtype="float64",
            device="cpu",
            num_parameters=0,
            training_data="fitted to metal properties (Jacobsen, Stoltze, Nørskov 1996)",
            license="LGPL-2.1 (ASE)",
            trained=True,
            properties=frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES}),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def compute(self, batch: Batch) -> list[Result]:
        results = []
        for system in batch.systems:
            atoms = atoms_from_system(system)
            atoms.positions = wrapped_positions(system)
            atoms.calc = self._calc
            result = Result()
            if Property.ENERGY in batch.properties:
                result.energy = float(atoms.get_potential_energy())
            if Property.FORCES in batch.properties:
                result.forces = atoms.get_forces()
            if Property.STRESS in batch.properties and system.cell is not None:
                result.stress = atoms.get_stress()
            if Property.ENERGIES in batch.properties:
                result.energies = atoms.get_potential_energies()
            results.append(result)
        return results

"""CHGNet (chgnet 0.4.2): pretrained weights shipped inside the wheel, batched over systems.

CHGNet's graph converter takes its neighbours from ``Structure.get_neighbor_list`` and builds the
bond graph and the three-body angles from that list alone. A system with a neighbour key (an MD
session) is handed to it as a Structure that answers that call from a skin list kept under the key
(mlipserve.neighbours): the same pairs in another order, so the same bonds and angles, which the
converter still builds every step (angles depend on the bond lengths at that step).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
from ase import units
from ase.stress import full_3x3_to_voigt_6_stress
from pymatgen.core import Lattice, Structure

from mlipserve.backends.base import Batch
from mlipserve.cost import angle_work
from mlipserve.geometry import wrapped_positions
from mlipserve.neighbours import DEFAULT_SESSIONS, DEFAULT_SKIN, Edges, NeighbourStats, VerletCache, canonical_order
from mlipserve_client.types import ModelInfo, Property, Result, System

VERSIONS = ("0.3.0", "0.2.0", "r2scan")
_TRAINING_DATA = {
    "0.3.0": "MPtrj (Materials Project relaxation trajectories, PBE/PBE+U), 1.58 M frames",
    "0.2.0": "MPtrj (Materials Project relaxation trajectories, PBE/PBE+U), 1.58 M frames",
    "r2scan": "MP-r2SCAN, transfer-learned from CHGNet 0.3.0",
}
# CHGNet embeds atomic numbers 1-94.
_ELEMENTS = tuple(range(1, 95))
# Extra vacuum (Å) beyond the atom-graph cutoff when boxing a system that was sent without a cell.
_BOX_MARGIN = 1.0
# The numerical_tol CHGNet's converter passes to get_neighbor_list: pymatgen keeps pairs up to it
# beyond the cutoff.
_NEIGHBOUR_TOLERANCE = 1e-8


class CHGNetBackend:
    """CHGNet energies, forces, stress (GPa -> eV/Å³), site energies and magnetic moments (μB).

    CHGNet needs a lattice for every structure. A system without a cell is boxed (each side its
    extent plus the cutoff plus a margin) with PBC off, which pymatgen's neighbour search honours, so
    the box changes nothing; such a system gets no stress, as stress has no meaning without a cell.

    ``neighbour_skin`` (Å) and ``neighbour_sessions`` size the skin neighbour lists kept for systems
    with a neighbour key (mlipserve.neighbours).
    """

    def __init__(self, model_id: str = "chgnet-0.3.0", version: str = "0.3.0", device: str = "cpu",
                 neighbour_skin: float = DEFAULT_SKIN, neighbour_sessions: int = DEFAULT_SESSIONS) -> None:
        from chgnet.model import CHGNet

        if version not in VERSIONS:
            raise ValueError(f"unknown CHGNet version {version!r}; known: {', '.join(VERSIONS)}")
        self.model = CHGNet.load(model_name=version, use_device=device, verbose=False)
        self.model.eval()
        # CHGNet prints a warning per isolated atom to stderr; a dilute gas is a valid request.
        self.model.graph_converter.set_isolated_atom_response("ignore")
        self.cutoff = float(self.model.graph_converter.atom_graph_cutoff)
        self._neighbours = VerletCache(self.cutoff, neighbour_skin, neighbour_sessions,
                                       tolerance=_NEIGHBOUR_TOLERANCE)
        self._info = ModelInfo(
            id=model_id,
            architecture="CHGNet",
            version=version,
            cutoff=self.cutoff,
            elements=_ELEMENTS,
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            device=str(device),
            num_parameters=self.model.n_params,
            training_data=_TRAINING_DATA[version],
            license="BSD-3-Clause (CHGNet code and weights)",
            trained=True,
            properties=frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES,
                                  Property.MAGMOMS}),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def neighbour_stats(self) -> NeighbourStats:
        return self._neighbours.stats()

    def cost(self, system: System) -> float:
        """Atoms, neighbour pairs and, what dominates CHGNet's memory, its three-body angles."""
        return angle_work(system, self.cutoff, float(self.model.graph_converter.bond_graph_cutoff))

    def _structure(self, system: System, key: Hashable | None) -> Structure:
        cell = system.cell
        if cell is None:
            extent = np.ptp(system.positions, axis=0)
            cell = np.diag(extent + self.cutoff + _BOX_MARGIN)
        lattice = Lattice(cell, pbc=tuple(bool(p) for p in system.pbc))
        positions = wrapped_positions(system)
        if key is None:
            return _SortedStructure(lattice, system.numbers.tolist(), positions, coords_are_cartesian=True)
        # The box of a system without a cell follows its extent, so it changes every step: the list
        # is kept for the system without it (no axis is periodic, so the box changes no pair).
        edges = self._neighbours.edges(key, positions, system.cell, system.pbc, system.numbers)
        return _ListedStructure(lattice, system.numbers.tolist(), positions, coords_are_cartesian=True,
                                edges=edges, cutoff=self.cutoff)

    def compute(self, batch: Batch) -> list[Result]:
        properties = batch.properties
        graphs = [self.model.graph_converter(self._structure(s, batch.neighbour_key(k)))
                  for k, s in enumerate(batch.systems)]
        task = "ef" + ("s" if Property.STRESS in properties else "") + ("m" if Property.MAGMOMS in properties else "")
        predictions = self.model.predict_graph(
            graphs,
            task=task,
            return_site_energies=Property.ENERGIES in properties,
            batch_size=len(graphs),
        )
        if isinstance(predictions, dict):
            predictions = [predictions]
        return [self._result(s, p, properties) for s, p in zip(batch.systems, predictions, strict=True)]

    def _result(self, system: System, prediction: dict, properties: frozenset[Property]) -> Result:
        result = Result()
        if Property.ENERGY in properties:
            # CHGNet predicts energy per atom.
            result.energy = float(prediction["e"]) * system.n_atoms
        if Property.FORCES in properties:
            result.forces = np.asarray(prediction["f"], dtype=np.float64)
        if Property.STRESS in properties and system.cell is not None:
            # CHGNet's stress is (1/V) dE/dε in GPa: ASE's sign, other unit.
            result.stress = full_3x3_to_voigt_6_stress(np.asarray(prediction["s"], dtype=np.float64) * units.GPa)
        if Property.ENERGIES in properties:
            result.energies = np.asarray(prediction["site_energies"], dtype=np.float64)
        if Property.MAGMOMS in properties:
            result.magmoms = np.asarray(prediction["m"], dtype=np.float64).reshape(-1)
        return result


def _sorted(center, neighbor, images, distances):
    """A neighbour list in the canonical order (mlipserve.neighbours.canonical_order)."""
    order = canonical_order(center, neighbor, images)
    return center[order], neighbor[order], images[order], distances[order]


class _SortedStructure(Structure):
    """A Structure whose neighbour list comes in the canonical order."""

    def get_neighbor_list(self, r, sites=None, numerical_tol=1e-8, exclude_self=True):
        return _sorted(*super().get_neighbor_list(r, sites, numerical_tol, exclude_self))


class _ListedStructure(Structure):
    """A Structure whose neighbour list, the one query CHGNet's converter makes, is given."""

    def __init__(self, *args, edges: Edges, cutoff: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._edges = edges
        self._cutoff = cutoff

    def get_neighbor_list(self, r, sites=None, numerical_tol=1e-8, exclude_self=True):
        if r != self._cutoff or (sites is not None and len(sites) != len(self)):
            raise ValueError(f"this structure holds the neighbours of all its sites within {self._cutoff} Å")
        edges = self._edges
        return _sorted(edges.i, edges.j, edges.shifts.astype(np.float64), np.linalg.norm(edges.vectors, axis=1))

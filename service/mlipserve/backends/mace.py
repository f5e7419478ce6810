"""MACE (mace-torch 0.3.16): a user model file, a state_dict + config, or a MACE-MP-0-shaped model
with random weights, evaluated over all systems of a Batch in one merged forward pass.

The merged graph is built here rather than with ``mace.data.AtomicData.from_config``: that function
creates every tensor in ``torch.get_default_dtype()``, so using it would mean flipping the
process-wide default dtype per request, and a replica may serve float32 and float64 models side by
side. The edges come from ``mace.data.neighborhood.get_neighborhood``, the neighbour list that
``MACECalculator`` uses, so the graph is the one MACE's own calculator builds; a system with a
neighbour key (an MD session) gets the same edges, in another order, from a skin list kept under it
(mlipserve.neighbours).
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from ase.stress import full_3x3_to_voigt_6_stress

from mlipserve.backends.base import Batch
from mlipserve.errors import UnsupportedElementError
from mlipserve.geometry import wrapped_positions
from mlipserve.neighbours import (
    DEFAULT_SESSIONS,
    DEFAULT_SKIN,
    NeighbourStats,
    VerletCache,
    canonical_order,
    lattice_vectors,
)
from mlipserve_client.types import ModelInfo, Property, Result, System

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROPERTIES = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES})

# MACE-MP-0 (Batatia et al., arXiv:2401.00096): MPtrj's 89 elements are H-Bi and Ac-Pu.
MP_ELEMENTS = tuple(range(1, 84)) + tuple(range(89, 95))
FOUNDATION_HIDDEN_IRREPS = {"mace-mp-0-small": "128x0e", "mace-mp-0-medium": "128x0e+128x1o"}
# Mean neighbour count within 6 Å over MPtrj, as stored in the MACE-MP-0 checkpoints; it only
# normalises the message sums, so random weights see activations of the intended size.
_MP_AVG_NUM_NEIGHBORS = 61.964672446250916
# Isolated-atom energies (E0s) of MPtrj are not in mace-torch's package data (mace_mp() downloads the
# model that holds them), so the random MP-shaped models use zeros: their energies are arbitrary anyway.


def _import_mace():
    """Import mace and e3nn. e3nn 0.4.4 unpickles its constants with torch.load, which torch >= 2.6
    refuses (``slice`` is not an allowed global) unless mace was imported first; allowing ``slice``
    for weights-only loading is harmless. Importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the
    whole process, which is why every torch.load below passes ``weights_only`` explicitly."""
    torch.serialization.add_safe_globals([slice])
    import e3nn.o3
    import mace.modules

    return mace.modules, e3nn.o3


class MACEBackend:
    """A MACE model: energy, forces, stress and per-atom energies (E0 included, as MACE's
    ``node_energy``); a multi-head model offers its heads as tasks.

    Give exactly one source:

    - ``checkpoint``: a whole-model pickle (``*.model``, ``torch.save(model)``). Unpickling runs code
      from the file (``torch.load(weights_only=False)``): load trusted files only, and prefer a
      state_dict + config, which also survives e3nn upgrades that break old pickles.
    - ``state_dict`` + ``config``: weights loaded with ``weights_only=True`` and a JSON file
      ``{"model_class", "dtype", "kwargs", "meta"?}`` whose kwargs are the MACE/ScaleShiftMACE
      constructor arguments, with classes, irreps and the gate given by name.
    - ``foundation``: ``"mace-mp-0-small"`` or ``"mace-mp-0-medium"``, the MACE-MP-0 architecture
      with random weights (``seed``); for load and throughput tests, never for physics.

    ``dtype`` ("float32" or "float64") is what the model runs in, whatever it was saved in.
    ``training_data``, ``license`` and ``trained`` describe a user model (defaults: the config's
    ``meta``, else "not stated" and trained). ``neighbour_skin`` (Å) and ``neighbour_sessions`` size
    the skin neighbour lists kept for systems with a neighbour key (mlipserve.neighbours).
    """

    def __init__(
        self,
        model_id: str = "mace",
        device: str = "cpu",
        dtype: str = "float64",
        checkpoint: str | None = None,
        state_dict: str | None = None,
        config: str | None = None,
        foundation: str | None = None,
        seed: int = 0,
        training_data: str | None = None,
        license: str | None = None,
        trained: bool | None = None,
        neighbour_skin: float = DEFAULT_SKIN,
        neighbour_sessions: int = DEFAULT_SESSIONS,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        sources = {"checkpoint": checkpoint, "state_dict": state_dict, "foundation": foundation}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of checkpoint, state_dict (+ config) or foundation; got {given or 'none'}"
            )
        if (state_dict is None) != (config is None):
            raise ValueError("state_dict and config go together")
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        modules, o3 = _import_mace()

        meta: dict = {}
        if checkpoint is not None:
            model = torch.load(checkpoint, map_location="cpu", weights_only=False)
            version = Path(checkpoint).stem
        elif state_dict is not None:
            spec = json.loads(Path(config).read_text())
            meta = spec.get("meta", {})
            built_in = DTYPES[spec.get("dtype", dtype)]
            model = _build(modules, o3, spec["model_class"], spec["kwargs"], built_in)
            model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True), strict=True)
            version = Path(state_dict).name.removesuffix(".pt").removesuffix(".state_dict")
        else:
            if foundation not in FOUNDATION_HIDDEN_IRREPS:
                known = ", ".join(FOUNDATION_HIDDEN_IRREPS)
                raise ValueError(f"unknown foundation {foundation!r}; known: {known}")
            with torch.random.fork_rng(devices=[]):  # leave the process's RNG stream untouched
                torch.manual_seed(seed)
                model = _build(modules, o3, "ScaleShiftMACE", _foundation_kwargs(foundation), self.dtype)
            version = f"{foundation} architecture, random weights (seed {seed})"
            meta = {
                "trained": False,
                "training_data": f"random weights (MACE-MP-0-{foundation.rsplit('-', 1)[1]} architecture); "
                "not MACE-MP-0",
                "license": "MIT (mace-torch code); weights generated here",
            }

        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # forces need d/dpositions only
        self.cutoff = float(self.model.r_max)
        self._neighbours = VerletCache(self.cutoff, neighbour_skin, neighbour_sessions)
        self._zs = np.array([int(z) for z in self.model.atomic_numbers], dtype=np.int64)
        # Atomic number -> one-hot column; -1 marks an element the model does not know.
        self._z_to_index = np.full(max(119, int(self._zs.max()) + 1), -1, dtype=np.int64)
        self._z_to_index[self._zs] = np.arange(len(self._zs))
        heads = list(getattr(self.model, "heads", None) or ["Default"])
        self._heads = heads
        # MACE's convention: the head named "Default", else (as its calculator falls back) the last.
        self._default_head = next((h for h in heads if h.lower() == "default"), heads[-1])
        self._info = ModelInfo(
            id=model_id,
            architecture=f"MACE ({type(self.model).__name__})",
            version=version,
            cutoff=self.cutoff,
            elements=tuple(int(z) for z in self._zs),
            dtype=dtype,
            device=str(self.device),
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            training_data=training_data or meta.get("training_data") or "not stated",
            license=license or meta.get("license") or "not stated",
            trained=bool(meta.get("trained", True)) if trained is None else trained,
            properties=PROPERTIES,
            tasks=tuple(heads) if len(heads) > 1 else (),
            default_task=self._default_head if len(heads) > 1 else "",
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def neighbour_stats(self) -> NeighbourStats:
        return self._neighbours.stats()

    def compute(self, batch: Batch) -> list[Result]:
        properties = batch.properties
        head = self._head_index(batch.task)
        graphs = [self._graph(i, s, batch.neighbour_key(i)) for i, s in enumerate(batch.systems)]
        data = self._collate(graphs, head)
        forces = Property.FORCES in properties
        stress = Property.STRESS in properties and any(s.cell is not None for s in batch.systems)
        with torch.set_grad_enabled(forces or stress):
            out = self.model(data, training=False, compute_force=forces, compute_stress=stress)
        ptr = data["ptr"].tolist()
        energy = out["energy"].detach().cpu().numpy().astype(np.float64)
        results = []
        for k, system in enumerate(batch.systems):
            atoms = slice(ptr[k], ptr[k + 1])
            result = Result()
            if Property.ENERGY in properties:
                result.energy = float(energy[k])
            if forces:
                result.forces = out["forces"][atoms].detach().cpu().numpy().astype(np.float64)
            if stress and system.cell is not None:
                # MACE's stress is (1/V) dE/dε over the cell passed in data["cell"], the true cell here.
                result.stress = full_3x3_to_voigt_6_stress(out["stress"][k].detach().cpu().numpy().astype(np.float64))
            if Property.ENERGIES in properties:
                result.energies = out["node_energy"][atoms].detach().cpu().numpy().astype(np.float64)
            results.append(result)
        return results

    def _head_index(self, task: str) -> int:
        head = task or self._default_head
        if head not in self._heads:
            heads = ", ".join(self._heads)
            raise ValueError(f"model {self._info.id!r} has no head {head!r}; its heads are {heads}")
        return self._heads.index(head)

    def _graph(self, index: int, system: System, key: Hashable | None) -> dict[str, np.ndarray]:
        from mace.data.neighborhood import get_neighborhood

        species = self._z_to_index[system.numbers]
        if (species < 0).any():
            atom = int(np.flatnonzero(species < 0)[0])
            raise UnsupportedElementError(
                f"systems[{index}].atomic_numbers[{atom}]",
                f"MACE model {self._info.id!r} has no element Z={int(system.numbers[atom])}",
            )
        positions = wrapped_positions(system)
        cell = system.cell if system.cell is not None else np.zeros((3, 3))
        if key is None:
            # get_neighborhood replaces the rows of non-periodic axes by a huge box (in place: a copy);
            # the unit shifts along those axes are 0, so the true cell gives the same shifts.
            edge_index, shifts, unit_shifts, _ = get_neighborhood(
                positions=positions,
                cutoff=self.cutoff,
                pbc=tuple(bool(p) for p in system.pbc),
                cell=np.array(cell, dtype=np.float64),
            )
        else:
            edges = self._neighbours.edges(key, positions, system.cell, system.pbc, system.numbers)
            edge_index, unit_shifts = np.stack((edges.i, edges.j)), edges.shifts
            shifts = lattice_vectors(unit_shifts, cell)
        order = canonical_order(edge_index[0], edge_index[1], unit_shifts)
        edge_index, shifts, unit_shifts = edge_index[:, order], shifts[order], unit_shifts[order]
        return {
            "species": species,
            "positions": positions,
            "cell": cell,
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
        }

    def _collate(self, graphs: list[dict[str, np.ndarray]], head: int) -> dict[str, torch.Tensor]:
        """One disconnected graph of all systems, laid out as mace's torch_geometric Batch lays it."""
        counts = [len(g["species"]) for g in graphs]
        offsets = np.concatenate([[0], np.cumsum(counts)])

        def floats(name: str) -> torch.Tensor:
            return torch.tensor(np.concatenate([g[name] for g in graphs]), dtype=self.dtype, device=self.device)

        species = torch.tensor(np.concatenate([g["species"] for g in graphs]), device=self.device)
        edge_index = np.concatenate([g["edge_index"] + offsets[k] for k, g in enumerate(graphs)], axis=1)
        return {
            "positions": floats("positions"),
            "node_attrs": torch.nn.functional.one_hot(species, num_classes=len(self._zs)).to(self.dtype),
            "edge_index": torch.tensor(edge_index, dtype=torch.long, device=self.device),
            "shifts": floats("shifts"),
            "unit_shifts": floats("unit_shifts"),
            "cell": floats("cell"),  # (3 * n_graphs, 3), as mace collates it
            "batch": torch.repeat_interleave(torch.arange(len(graphs), device=self.device),
                                             torch.tensor(counts, device=self.device)),
            "ptr": torch.tensor(offsets, dtype=torch.long, device=self.device),
            "head": torch.full((len(graphs),), head, dtype=torch.long, device=self.device),
        }


def _foundation_kwargs(name: str) -> dict:
    """Constructor arguments with MACE-MP-0 small/medium's hyperparameters (Batatia et al.; mace's
    run_train defaults for what the paper does not state: residual first interaction, radial MLP)."""
    return {
        "r_max": 6.0,
        "num_bessel": 10,
        "num_polynomial_cutoff": 5,
        "max_ell": 3,
        "interaction_cls": "RealAgnosticResidualInteractionBlock",
        "interaction_cls_first": "RealAgnosticResidualInteractionBlock",
        "num_interactions": 2,
        "num_elements": len(MP_ELEMENTS),
        "hidden_irreps": FOUNDATION_HIDDEN_IRREPS[name],
        "MLP_irreps": "16x0e",
        "gate": "silu",
        "atomic_energies": [0.0] * len(MP_ELEMENTS),
        "avg_num_neighbors": _MP_AVG_NUM_NEIGHBORS,
        "atomic_numbers": list(MP_ELEMENTS),
        "correlation": 3,
        "radial_type": "bessel",
        "radial_MLP": [64, 64, 64],
        "pair_repulsion": False,
        "distance_transform": "None",
        "use_reduced_cg": False,  # MACE-MP-0 predates the reduced Clebsch-Gordan basis
        "atomic_inter_scale": 1.0,
        "atomic_inter_shift": 0.0,
    }


def _build(modules, o3, model_class: str, kwargs: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate a MACE class from JSON-friendly kwargs (names for classes, irreps and the gate)."""
    kw = dict(kwargs)
    for name in ("interaction_cls", "interaction_cls_first"):
        kw[name] = modules.interaction_classes[kw[name]]
    for name in ("hidden_irreps", "MLP_irreps"):
        kw[name] = o3.Irreps(kw[name])
    kw["gate"] = getattr(torch.nn.functional, kw["gate"])
    kw["atomic_energies"] = np.asarray(kw["atomic_energies"], dtype=np.float64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # MACE creates its buffers in the default dtype
    try:
        return getattr(modules, model_class)(**kw)
    finally:
        torch.set_default_dtype(previous)

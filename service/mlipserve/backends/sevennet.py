"""SevenNet (sevenn 0.10.4, or >= 0.11 in its own environment): pretrained checkpoints shipped inside
the wheel, or a user checkpoint, evaluated over all systems of a Batch in one merged forward pass.

Each system's graph is built exactly as ``SevenNetCalculator`` builds it
(``sevenn.train.dataload.unlabeled_atoms_to_graph``), and the graphs are merged with torch_geometric's
``Batch``; the model runs in its batched mode, which gives one energy, stress and strain per graph. A
system with a neighbour key (an MD session) gets the same edges, in another order, from a skin list
kept under it (mlipserve.neighbours).

Multi-fidelity (multi-modal) checkpoints such as SevenNet-MF-0 need sevenn >= 0.11, which needs
e3nn >= 0.5 and so cannot share the main environment with mace-torch 0.3.16 (e3nn 0.4.4): a
deployment serving one runs in its own Ray ``runtime_env``, as fairchem does (a clone of the main
environment with sevenn >= 0.11 pip-installed on top, which upgrades e3nn there only). The model's
modalities (fidelities, e.g. ``PBE`` and ``R2SCAN``) are its tasks: a request picks one with its
``task`` and every system of the batch is evaluated at it, in the same single forward pass (each
graph carries the modality, as in sevenn's own batched training and inference). Which sevenn is
installed is read from its distribution metadata; sevenn itself is imported only inside this module's
functions, and nothing here imports grpc or ray.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from importlib.metadata import version as _distribution_version
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError, UnsupportedElementError
from mlipserve.geometry import wrapped_positions
from mlipserve.neighbours import DEFAULT_SESSIONS, DEFAULT_SKIN, Edges, NeighbourStats, VerletCache, canonical_order
from mlipserve_client.types import ModelInfo, Property, Result, System

PROPERTIES = frozenset({Property.ENERGY, Property.FORCES, Property.STRESS, Property.ENERGIES})
_MPTRJ = "MPtrj (Materials Project relaxation trajectories, PBE/PBE+U), 1.58 M frames"
# Pretrained names sevenn 0.10.4 resolves (sevenn.util.pretrained_name_to_path), with what they are.
PRETRAINED = {
    "7net-0": ("SevenNet-0 (11Jul2024)", _MPTRJ),
    "7net-0_22may2024": ("SevenNet-0 (22May2024)", "MPF.2021.2.8 (M3GNet's Materials Project dataset)"),
    "7net-l3i5": ("SevenNet-l3i5", _MPTRJ),
}
# Multi-fidelity (multi-modal) checkpoints and the ``modal`` argument arrived in sevenn 0.11, which
# needs e3nn >= 0.5 and so cannot share an environment with mace-torch 0.3.16 (e3nn 0.4.4).
_NEEDS_SEVENN_011 = ("7net-mf-0", "7net-mf-ompa", "7net-omat")
# Pretrained names resolved only under sevenn >= 0.11 (checkpoints shipped in its wheel, 0.11.0-0.13.0).
PRETRAINED_MULTI_FIDELITY = {
    "7net-mf-0": ("SevenNet-MF-0 (16Dec2024)",
                  "Materials Project relaxation trajectories: PBE/PBE+U (MPtrj) and r2SCAN"),
}
# Pretrained names that sevenn >= 0.11 knows but does not ship: it downloads them from GitHub at first
# use, which a server without internet access cannot (and this backend does not) do.
_DOWNLOADED_BY_SEVENN = ("7net-mf-ompa", "7net-omat", "7net-omni", "7net-omni-i8", "7net-omni-i12")
_LICENSE = "GPL-3.0 (SevenNet code and pretrained weights)"
# SevenNet's stress is [xx, yy, zz, xy, yz, zx] of -(1/V) dE/dε; ASE's Voigt order is xx yy zz yz xz xy.
_TO_ASE_VOIGT = [0, 1, 2, 4, 5, 3]


def _sevenn_version() -> str:
    return _distribution_version("sevenn")


def _has_multi_fidelity(version: str) -> bool:
    """sevenn >= 0.11 (a version string such as ``0.10.4`` or ``0.11.2.post1``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= (0, 11)


def _load_checkpoint(path: str) -> dict:
    """A SevenNet checkpoint without running code from it: its config holds numpy arrays, so
    numpy's array reconstructor is the only global allowed beyond torch's weights-only set."""
    from numpy._core.multiarray import _reconstruct

    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               np.dtypes.Float32DType, np.dtypes.Float64DType, np.dtypes.Int64DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


class SevenNetBackend:
    """SevenNet energy, forces, stress and per-atom energies, in float32 (how it was trained).

    ``checkpoint`` is a pretrained name (``7net-0`` = SevenNet-0 11Jul2024, ``7net-0_22may2024``,
    ``7net-l3i5``; with sevenn >= 0.11 also ``7net-mf-0``) or the path of a SevenNet checkpoint
    (``*.pth``), loaded weights-only. ``training_data`` and ``license`` describe a user checkpoint.

    A multi-fidelity checkpoint (sevenn >= 0.11) has its modalities as tasks (SevenNet-MF-0: ``R2SCAN``
    and ``PBE``); ``modal`` is the default task, for requests that name none (matched case-insensitively,
    as sevenn documents). Without it the checkpoint's own ``default_modal`` is the default (``PBE``
    for SevenNet-MF-0), or the only modality; failing both, every request must name one. Under sevenn
    0.10.4, which has no multi-fidelity models, a multi-fidelity name and any ``modal`` are rejected;
    under sevenn >= 0.11 so is a ``modal`` for a single-fidelity checkpoint.

    ``neighbour_skin`` (Å) and ``neighbour_sessions`` size the skin neighbour lists kept for systems
    with a neighbour key (mlipserve.neighbours).
    """

    def __init__(
        self,
        model_id: str = "sevennet-0",
        device: str = "cpu",
        checkpoint: str = "7net-0",
        modal: str | None = None,
        training_data: str | None = None,
        license: str | None = None,
        neighbour_skin: float = DEFAULT_SKIN,
        neighbour_sessions: int = DEFAULT_SESSIONS,
    ) -> None:
        sevenn_version = _sevenn_version()
        multi_fidelity = _has_multi_fidelity(sevenn_version)
        if not multi_fidelity and (checkpoint.lower() in _NEEDS_SEVENN_011 or modal is not None):
            raise ValueError(
                f"multi-fidelity SevenNet models (checkpoint {checkpoint!r}, modal {modal!r}) need sevenn >= 0.11, "
                f"which needs e3nn >= 0.5; this environment has sevenn {sevenn_version} "
                f"(pinned with mace-torch's e3nn 0.4.4)"
            )
        torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 on torch >= 2.6 (see backends.mace)
        import sevenn.util

        pretrained = {**PRETRAINED, **PRETRAINED_MULTI_FIDELITY} if multi_fidelity else PRETRAINED
        name = checkpoint.lower()
        if name in pretrained:
            path = sevenn.util.pretrained_name_to_path(name)
            version, default_training_data = pretrained[name]
        elif Path(checkpoint).is_file():
            path, version, default_training_data = checkpoint, Path(checkpoint).stem, "not stated"
        elif multi_fidelity and name in _DOWNLOADED_BY_SEVENN:
            raise ValueError(
                f"SevenNet checkpoint {checkpoint!r} is not shipped in the sevenn {sevenn_version} wheel (sevenn "
                f"downloads it at first use, which this service does not do): download its .pth file and give "
                f"its path as checkpoint"
            )
        else:
            known = ", ".join(pretrained)
            raise ValueError(f"unknown SevenNet checkpoint {checkpoint!r}: not a file, nor one of {known}")
        if multi_fidelity:
            # sevenn >= 0.11 builds a model from a path only (SevenNetCheckpoint, which unpickles with
            # weights_only=False): the file must first load weights-only, so that unpickling it runs
            # nothing beyond torch's tensors and numpy's arrays.
            _load_checkpoint(path)
            model, config = sevenn.util.model_from_checkpoint(path)
        else:
            model, config = sevenn.util.model_from_checkpoint(_load_checkpoint(path))
        modal_map = dict(getattr(model, "modal_map", None) or {}) if multi_fidelity else {}
        # The modalities in the model's index order (SevenNet-MF-0: R2SCAN, PBE).
        self._modalities = tuple(sorted(modal_map, key=modal_map.__getitem__))
        default_modal = self._default_modal(checkpoint, modal, config)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # forces and stress need d/dpositions and d/dstrain only
        self.model.set_is_batch_data(True)
        self.cutoff = float(config["cutoff"])
        self._neighbours = VerletCache(self.cutoff, neighbour_skin, neighbour_sessions)
        self._elements = np.array(sorted(int(z) for z in config["_type_map"]), dtype=np.int64)
        self._info = ModelInfo(
            id=model_id,
            architecture="SevenNet",
            version=f"{version}, sevenn config {config.get('version', '?')}",
            cutoff=self.cutoff,
            elements=tuple(int(z) for z in self._elements),
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            device=str(self.device),
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            training_data=training_data or default_training_data,
            license=license or _LICENSE,
            trained=True,
            properties=PROPERTIES,
            tasks=self._modalities,
            default_task=default_modal,
        )

    def _default_modal(self, checkpoint: str, modal: str | None, config: dict) -> str:
        """The default task: ``modal`` (case-insensitive), else the checkpoint's default_modal, else
        the only modality, else none ("")."""
        modalities = self._modalities
        if not modalities:
            if modal is not None:
                raise ValueError(
                    f"SevenNet checkpoint {checkpoint!r} has a single fidelity; modal {modal!r} does not apply"
                )
            return ""
        if modal is not None:
            matches = [m for m in modalities if m == modal] or [m for m in modalities if m.lower() == modal.lower()]
            if len(matches) != 1:
                offered = ", ".join(modalities)
                raise ValueError(
                    f"SevenNet checkpoint {checkpoint!r} has no modal {modal!r}; its modalities are {offered}"
                )
            return matches[0]
        default = config.get("default_modal")
        if isinstance(default, str) and default in modalities:
            return default
        return modalities[0] if len(modalities) == 1 else ""

    @property
    def info(self) -> ModelInfo:
        return self._info

    def neighbour_stats(self) -> NeighbourStats:
        return self._neighbours.stats()

    def _modal(self, batch: Batch) -> str | None:
        """The batch's modality (a multi-fidelity model), or None (a single-fidelity one)."""
        if not self._modalities:
            if batch.task:
                raise ValueError(f"model {self._info.id!r} has a single task; got task {batch.task!r}")
            return None
        modal = batch.task or self._info.default_task
        offered = ", ".join(self._modalities)
        if not modal:
            raise InvalidSystemError("task", f"model {self._info.id!r} has tasks (modalities) {offered}: name one")
        if modal not in self._modalities:
            raise InvalidSystemError("task", f"model {self._info.id!r} has no task {modal!r}; its tasks are {offered}")
        return modal

    def compute(self, batch: Batch) -> list[Result]:
        import sevenn._keys as KEY
        from torch_geometric.data import Batch as GraphBatch

        modal = self._modal(batch)
        graphs = [self._graph(i, s, batch.neighbour_key(i)) for i, s in enumerate(batch.systems)]
        if modal is not None:
            # Every graph of the batch at the batch's modality; batched, the model maps this list of
            # names to modal indices (AtomGraphSequential._eval_modal_map).
            for graph in graphs:
                graph[KEY.DATA_MODALITY] = modal
        graphs = GraphBatch.from_data_list(graphs).to(self.device)
        ptr = graphs.ptr.tolist()
        # SevenNet always differentiates for forces and stress (its force module is part of the
        # model), so it needs autograd even if the caller runs under torch.no_grad().
        with torch.enable_grad():
            out = self.model(graphs)
        energy = out[KEY.PRED_TOTAL_ENERGY].detach().cpu().numpy().astype(np.float64).reshape(-1)
        forces = out[KEY.PRED_FORCE].detach().cpu().numpy().astype(np.float64)
        stress = -out[KEY.PRED_STRESS].detach().cpu().numpy().astype(np.float64)[:, _TO_ASE_VOIGT]
        energies = out[KEY.ATOMIC_ENERGY].detach().cpu().numpy().astype(np.float64).reshape(-1)
        properties = batch.properties
        results = []
        for k, system in enumerate(batch.systems):
            atoms = slice(ptr[k], ptr[k + 1])
            result = Result()
            if Property.ENERGY in properties:
                result.energy = float(energy[k])
            if Property.FORCES in properties:
                result.forces = forces[atoms]
            if Property.STRESS in properties and system.cell is not None:
                result.stress = stress[k]
            if Property.ENERGIES in properties:
                result.energies = energies[atoms]
            results.append(result)
        return results

    def _graph(self, index: int, system: System, key: Hashable | None):
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        unknown = ~np.isin(system.numbers, self._elements)
        if unknown.any():
            atom = int(np.flatnonzero(unknown)[0])
            raise UnsupportedElementError(
                f"systems[{index}].atomic_numbers[{atom}]",
                f"SevenNet model {self._info.id!r} has no element Z={int(system.numbers[atom])}",
            )
        # A system without a cell gets a zero cell with PBC off: the neighbour list then boxes it
        # with vacuum (no images), and its (meaningless) stress is dropped in compute.
        atoms = Atoms(
            numbers=system.numbers,
            positions=wrapped_positions(system),
            cell=system.cell if system.cell is not None else np.zeros((3, 3)),
            pbc=system.pbc,
        )
        if key is None:
            graph = unlabeled_atoms_to_graph(atoms, self.cutoff)
        else:
            edges = self._neighbours.edges(key, atoms.positions, system.cell, system.pbc, system.numbers)
            graph = _graph_with_edges(atoms, edges)
        return AtomGraphData.from_numpy_dict(_in_canonical_order(graph))


def _in_canonical_order(graph: dict) -> dict:
    """``graph`` with its edges in the canonical order (mlipserve.neighbours.canonical_order)."""
    import sevenn._keys as KEY

    edge_index, shifts = graph[KEY.EDGE_IDX], graph[KEY.CELL_SHIFT]
    order = canonical_order(edge_index[0], edge_index[1], np.asarray(shifts))
    return {**graph, KEY.EDGE_IDX: edge_index[:, order], KEY.EDGE_VEC: graph[KEY.EDGE_VEC][order],
            KEY.CELL_SHIFT: shifts[order]}


def _graph_with_edges(atoms: Atoms, edges: Edges) -> dict:
    """What ``unlabeled_atoms_to_graph`` returns, with ``edges`` for its neighbour search. Its cell has
    a huge box along non-periodic axes, this one the true cell: the model uses the cell only to
    shift edges, and along those axes every shift is 0."""
    import sevenn._keys as KEY

    numbers = atoms.get_atomic_numbers()
    volume = atoms.cell.volume
    return {
        KEY.NODE_FEATURE: numbers,
        KEY.ATOMIC_NUMBERS: numbers,
        KEY.POS: atoms.get_positions(),
        KEY.EDGE_IDX: np.stack((edges.i, edges.j)),
        KEY.EDGE_VEC: edges.vectors,
        KEY.CELL: np.array(atoms.get_cell()),
        KEY.CELL_SHIFT: edges.shifts,
        KEY.CELL_VOLUME: np.array(volume if volume else np.finfo(float).eps),  # sevenn's guard for no cell
        KEY.NUM_ATOMS: np.array(len(numbers)),
        KEY.INFO: {},
    }

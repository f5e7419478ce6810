"""SevenNet (sevenn 0.10.4): pretrained checkpoints shipped inside the wheel, or a user checkpoint,
evaluated over all systems of a Batch in one merged forward pass.

Each system's graph is built exactly as ``SevenNetCalculator`` builds it
(``sevenn.train.dataload.unlabeled_atoms_to_graph``), and the graphs are merged with torch_geometric's
``Batch``; the model runs in its batched mode, which gives one energy, stress and strain per graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mlipserve.backends.base import Batch
from mlipserve.errors import UnsupportedElementError
from mlipserve.geometry import wrapped_positions
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
_LICENSE = "GPL-3.0 (SevenNet code and pretrained weights)"
# SevenNet's stress is [xx, yy, zz, xy, yz, zx] of -(1/V) dE/dε; ASE's Voigt order is xx yy zz yz xz xy.
_TO_ASE_VOIGT = [0, 1, 2, 4, 5, 3]


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
    ``7net-l3i5``) or the path of a SevenNet checkpoint (``*.pth``), loaded weights-only.
    ``training_data`` and ``license`` describe a user checkpoint. ``modal`` selects the fidelity of
    a multi-fidelity model, which sevenn 0.10.4 does not have: any value is rejected.
    """

    def __init__(
        self,
        model_id: str = "sevennet-0",
        device: str = "cpu",
        checkpoint: str = "7net-0",
        modal: str | None = None,
        training_data: str | None = None,
        license: str | None = None,
    ) -> None:
        if checkpoint.lower() in _NEEDS_SEVENN_011 or modal is not None:
            raise ValueError(
                f"multi-fidelity SevenNet models (checkpoint {checkpoint!r}, modal {modal!r}) need sevenn >= 0.11, "
                f"which needs e3nn >= 0.5; this environment has sevenn 0.10.4 (pinned with mace-torch's e3nn 0.4.4)"
            )
        torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 on torch >= 2.6 (see backends.mace)
        import sevenn.util

        name = checkpoint.lower()
        if name in PRETRAINED:
            path = sevenn.util.pretrained_name_to_path(name)
            version, default_training_data = PRETRAINED[name]
        elif Path(checkpoint).is_file():
            path, version, default_training_data = checkpoint, Path(checkpoint).stem, "not stated"
        else:
            known = ", ".join(PRETRAINED)
            raise ValueError(f"unknown SevenNet checkpoint {checkpoint!r}: not a file, nor one of {known}")
        model, config = sevenn.util.model_from_checkpoint(_load_checkpoint(path))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # forces and stress need d/dpositions and d/dstrain only
        self.model.set_is_batch_data(True)
        self.cutoff = float(config["cutoff"])
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
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def compute(self, batch: Batch) -> list[Result]:
        import sevenn._keys as KEY
        from torch_geometric.data import Batch as GraphBatch

        if batch.task:
            raise ValueError(f"model {self._info.id!r} has a single task; got task {batch.task!r}")
        graphs = GraphBatch.from_data_list([self._graph(i, s) for i, s in enumerate(batch.systems)]).to(self.device)
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

    def _graph(self, index: int, system: System):
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
        return AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff))

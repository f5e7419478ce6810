"""fairchem (fairchem-core 2.x): eSEN and UMA inference checkpoints, batched over systems.

fairchem-core needs e3nn >= 0.5 and mace-torch pins e3nn 0.4.4, so fairchem is not importable in the
main environment: a deployment serving this backend runs in its own Ray ``runtime_env`` (or image).
fairchem is therefore imported only inside this module's functions, and nothing here imports grpc
or ray.

A checkpoint is fairchem's inference checkpoint (``MLIPInferenceCheckpoint``: model_config,
model_state_dict, ema_state_dict, tasks_config), loaded with fairchem's ``load_predict_unit`` from a
local path (no Hugging Face download). A UMA checkpoint has several tasks (omat, omol, oc20, odac,
omc, ...); an eSEN checkpoint usually has one.

Charge and spin: fairchem's ASE calculator feeds ``atoms.info["charge"]`` and ``atoms.info["spin"]``
(multiplicity) to the model. Only the omol data carries them: every other dataset was trained with
charge 0 and spin 0 (fairchem's ``AtomicData.from_ase`` defaults). So for a task in
``charge_spin_tasks`` (default: omol) a System's ``total_charge`` and ``spin_multiplicity`` (0 = the
default, 1) go to the model; for any other task the model gets 0 and 0, and a charged system or a
multiplicity above 1 is rejected rather than answered with numbers the model never learned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ase.stress import full_3x3_to_voigt_6_stress

from mlipserve.backends.base import Batch
from mlipserve.errors import InvalidSystemError
from mlipserve.geometry import wrapped_positions
from mlipserve_client.types import ModelInfo, Property, Result, System

# fairchem's ranges (fairchem.core.units.mlip_unit.api.inference.CHARGE_RANGE / SPIN_RANGE).
_CHARGE_RANGE = (-100, 100)
_SPIN_RANGE = (0, 100)
# fairchem's property names -> ours. fairchem also offers "hessian", which mlipserve has no field for.
_PROPERTIES = {"energy": Property.ENERGY, "forces": Property.FORCES, "stress": Property.STRESS}


class FAIRChemBackend:
    """A fairchem eSEN or UMA inference checkpoint (energy, forces, stress).

    Options (the ``options`` of a model in the service config):
      checkpoint: path of the inference checkpoint (.pt). Required; a registered model name such as
        ``uma-s-1p2`` is not accepted, because resolving it downloads from the Hugging Face hub.
      task: the default task for requests that name none; may be omitted when the checkpoint has
        one task.
      inference_settings: a fairchem preset name. "batch" (default) keeps MOLE unmerged and does not
        compile, which is what heterogeneous batches need; fairchem's own default (multigpu:
        merge_mole + torch.compile) compiled for ~5 min on this CPU and falls back on every change
        of composition or task.
      dtype: "float32" (default) or "float64" (fairchem's base_precision_dtype).
      atom_refs: optional ``{task: {Z: energy}}`` (or ``{task: {Z: {charge: energy}}}``), fairchem's
        isolated-atom reference energies; without them a lone atom without PBC cannot be computed
        (the model needs at least one neighbour), as in fairchem.
      charge_spin_tasks: tasks whose training data carried charge and spin (default: omol).
      trained, training_data, license, version: descriptive, reported in ``info``.
    """

    def __init__(
        self,
        model_id: str = "fairchem",
        device: str = "cpu",
        checkpoint: str | None = None,
        task: str | None = None,
        inference_settings: str = "batch",
        dtype: str = "float32",
        atom_refs: Mapping[str, Mapping] | None = None,
        charge_spin_tasks: Sequence[str] = ("omol",),
        trained: bool = True,
        training_data: str = "",
        license: str = "",  # the ModelInfo field's name
        version: str = "",
    ) -> None:
        from fairchem.core.units.mlip_unit import load_predict_unit
        from fairchem.core.units.mlip_unit.api.inference import NAME_TO_INFERENCE_SETTING

        if checkpoint is None:
            raise ValueError("FAIRChemBackend needs checkpoint=<path of a fairchem inference checkpoint>")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"fairchem checkpoint {checkpoint!r} does not exist")
        if device not in ("cpu", "cuda"):
            # fairchem's MLIPPredictUnit accepts only "cpu" or "cuda" (it picks the local rank's GPU).
            raise ValueError(f"device must be 'cpu' or 'cuda' for fairchem, not {device!r}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, not {dtype!r}")

        if inference_settings not in NAME_TO_INFERENCE_SETTING:
            names = ", ".join(NAME_TO_INFERENCE_SETTING)
            raise ValueError(f"unknown fairchem inference_settings {inference_settings!r}; presets: {names}")
        # A copy: fairchem's presets are shared module-level objects.
        settings = dataclasses.replace(NAME_TO_INFERENCE_SETTING[inference_settings], base_precision_dtype=dtype)
        self.predict_unit = load_predict_unit(
            checkpoint,
            inference_settings=settings,
            device=device,
            atom_refs=dict(atom_refs) if atom_refs else None,
        )
        self._dtype = settings.base_precision_dtype
        self._dataset_to_tasks = self.predict_unit.dataset_to_tasks
        tasks = tuple(self._dataset_to_tasks)
        if task is not None and task not in tasks:
            raise ValueError(f"checkpoint {checkpoint!r} has no task {task!r}; its tasks are {', '.join(tasks)}")
        default_task = task if task is not None else (tasks[0] if len(tasks) == 1 else "")
        self._charge_spin_tasks = frozenset(charge_spin_tasks)

        model = self.predict_unit.model.module
        backbone = model.backbone
        self.cutoff = float(backbone.cutoff)
        num_experts = int(getattr(backbone, "num_experts", 0) or 0)
        model_id_tag = getattr(model, "model_id", None) or ""
        if type(backbone).__name__.startswith("eSCNMD"):
            architecture = "UMA" if num_experts > 0 else "eSEN"
        else:
            architecture = type(backbone).__name__
        max_elements = int(getattr(backbone, "max_num_elements", 100))
        # Properties every task offers (a trained or backbone-added task per property).
        offered = set(_PROPERTIES)
        for task_list in self._dataset_to_tasks.values():
            offered &= {t.property for t in task_list}
        uses_charge_spin = bool(self._charge_spin_tasks & set(tasks))
        self._info = ModelInfo(
            id=model_id,
            architecture=architecture,
            version=version or model_id_tag,
            cutoff=self.cutoff,
            elements=tuple(range(1, max_elements)),
            dtype=dtype,
            device=device,
            num_parameters=sum(p.numel() for p in model.parameters()),
            training_data=training_data,
            license=license,
            trained=trained,
            properties=frozenset(_PROPERTIES[p] for p in offered),
            uses_total_charge=uses_charge_spin,
            uses_spin=uses_charge_spin,
            tasks=tasks,
            default_task=default_task,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # --- input ---------------------------------------------------------------------------------

    def _task(self, batch: Batch) -> str:
        task = batch.task or self._info.default_task
        if not task:
            tasks = ", ".join(self._info.tasks)
            raise InvalidSystemError("task", f"model {self._info.id!r} has tasks {tasks}: name one")
        if task not in self._dataset_to_tasks:
            tasks = ", ".join(self._info.tasks)
            raise InvalidSystemError("task", f"model {self._info.id!r} has no task {task!r}; its tasks are {tasks}")
        return task

    def _charge_spin(self, system: System, where: str, task: str) -> tuple[int, int]:
        """fairchem's (charge, spin) for one system: integers, defaults as fairchem's calculator."""
        charge = system.total_charge
        if not math.isfinite(charge) or charge != round(charge):
            raise InvalidSystemError(f"{where}.total_charge", f"must be an integer for fairchem, not {charge}")
        charge = round(charge)
        spin = int(system.spin_multiplicity)
        if task in self._charge_spin_tasks:
            spin = spin or 1  # fairchem's default multiplicity for omol (DEFAULT_SPIN_OMOL)
            for name, value, (low, high) in (("total_charge", charge, _CHARGE_RANGE),
                                             ("spin_multiplicity", spin, _SPIN_RANGE)):
                if not low <= value <= high:
                    raise InvalidSystemError(f"{where}.{name}", f"{value} is outside fairchem's range {low}..{high}")
            return charge, spin
        # Other tasks were trained with charge 0 and spin 0 only.
        charged_tasks = sorted(self._charge_spin_tasks & set(self._info.tasks))
        hint = f"; use task {' or '.join(map(repr, charged_tasks))}" if charged_tasks else ""
        model = f"task {task!r} of model {self._info.id!r}"
        if charge != 0:
            raise InvalidSystemError(f"{where}.total_charge", f"{model} was trained on neutral systems only{hint}")
        if spin > 1:
            raise InvalidSystemError(f"{where}.spin_multiplicity", f"{model} has no spin input{hint}")
        return 0, 0

    def _atomic_data(self, system: System, where: str, task: str):
        from ase import Atoms
        from fairchem.core.datasets.atomic_data import AtomicData

        charge, spin = self._charge_spin(system, where, task)
        atoms = Atoms(
            numbers=system.numbers,
            # Wrapped into the cell and shifted near the origin: same energy, forces and stress, but
            # float32 keeps its precision for atoms far outside their cell (unwrapped MD).
            positions=wrapped_positions(system),
            cell=system.cell if system.cell is not None else np.zeros((3, 3)),
            pbc=system.pbc,
        )
        atoms.info["charge"] = charge
        atoms.info["spin"] = spin
        # The model's own checks (fairchem's calculator calls the same before converting).
        self.predict_unit.validate_atoms_data(atoms, task)
        # As FAIRChemCalculator's a2g: internal (on-the-fly) graph, charge and spin from atoms.info.
        return AtomicData.from_ase(
            atoms,
            task_name=task,
            r_edges=False,
            r_data_keys=["spin", "charge"],
            max_neigh=None,
            radius=self.cutoff,
            target_dtype=self._dtype,
        )

    # --- compute -------------------------------------------------------------------------------

    def compute(self, batch: Batch) -> list[Result]:
        from fairchem.core.datasets.atomic_data import atomicdata_list_to_batch

        task = self._task(batch)
        data = [self._atomic_data(s, f"systems[{i}]", task) for i, s in enumerate(batch.systems)]
        # fairchem computes a lone atom without PBC from reference energies and only alone in its
        # batch; everything else goes through the model in one merged forward pass.
        lone = [i for i, s in enumerate(batch.systems) if s.n_atoms == 1 and not s.is_periodic]
        merged = [i for i in range(len(data)) if i not in set(lone)]
        results: list[Result | None] = [None] * len(data)
        groups = [merged] if merged else []
        groups += [[i] for i in lone]
        for group in groups:
            try:
                predictions = self.predict_unit.predict(atomicdata_list_to_batch([data[i] for i in group]))
            except ValueError as err:
                if len(group) == 1 and group[0] in lone:
                    raise InvalidSystemError(f"systems[{group[0]}]", str(err)) from err
                raise
            self._split(predictions, [batch.systems[i] for i in group], group, batch.properties, results)
        return results  # type: ignore[return-value]

    @staticmethod
    def _split(
        predictions: dict,
        systems: list[System],
        indices: list[int],
        properties: frozenset[Property],
        results: list[Result | None],
    ) -> None:
        """fairchem's collated predictions (energy (n,), forces (atoms, 3) in system order,
        stress (n, 9)) -> one Result per system."""

        def array(name: str) -> np.ndarray | None:
            value = predictions.get(name)
            return None if value is None else value.detach().cpu().numpy().astype(np.float64)

        energy, forces, stress = array("energy").reshape(-1), array("forces"), array("stress")
        offsets = np.cumsum([0] + [s.n_atoms for s in systems])
        for k, (system, index) in enumerate(zip(systems, indices, strict=True)):
            result = Result()
            if Property.ENERGY in properties:
                result.energy = float(energy[k])
            if Property.FORCES in properties and forces is not None:
                result.forces = forces[offsets[k]:offsets[k + 1]].copy()
            if Property.STRESS in properties and stress is not None and system.cell is not None:
                # fairchem's stress is (1/V) dE/dε in eV/Å³, ASE's sign: its calculator converts it
                # exactly so.
                result.stress = full_3x3_to_voigt_6_stress(stress[k].reshape(3, 3))
            results[index] = result

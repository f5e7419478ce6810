"""Shared by the workflow tests: an in-process batch queue over a real backend, a runner that
collects a workflow's events, thread limits for this 2-core machine, and the local references (each
workflow written out plainly with the model's own ASE calculator and the same libraries)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np
import pytest
from ase import Atoms, units
from ase.eos import EquationOfState
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE
from ase.stress import voigt_6_to_full_3x3_stress

from mlipserve.backends.base import Batch, check_request, cost_function
from mlipserve.batching import BatchPolicy, BatchQueue
from mlipserve.workflows import run_workflow
from mlipserve_client.types import ComputeRequest
from mlipserve_client.workflow_types import (
    ElasticOptions,
    EOSOptions,
    PhononOptions,
    RelaxOptions,
    StructureError,
    StructureResult,
    WorkflowSummary,
)


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """One torch and one BLAS thread in the modules that import this fixture. Two cores shared by the
    model lane, the workflow threads and other processes: with their own thread pools, torch ran
    CHGNet ~20x and OpenBLAS ran FrechetCellFilter's 3x3 matrix functions up to 50x slower here."""
    import scipy.linalg  # noqa: F401 - loads scipy's own OpenBLAS, so that the limit reaches it
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chgnet_backend():
    from mlipserve.backends.chgnet import CHGNetBackend

    return CHGNetBackend(model_id="chgnet-0.3.0", version="0.3.0")


@dataclass
class Served:
    """A backend behind an in-process BatchQueue (built on the running loop), as a model's queue."""

    backend: object
    policy: BatchPolicy = field(default_factory=lambda: BatchPolicy(budget=math.inf, max_wait_s=0.005))
    requests: int = 0
    batches: list[Batch] = field(default_factory=list)
    queue: BatchQueue | None = None

    def start(self, lanes) -> BatchQueue:
        def compute(batch: Batch):
            self.batches.append(batch)
            return self.backend.compute(batch)

        self.queue = BatchQueue("model", compute, cost_function(self.backend), self.policy, *lanes)
        return self.queue

    async def evaluate(self, systems, properties):
        """What the server binds: the ingress's checks, then one request on the queue."""
        self.requests += 1
        check_request(self.backend.info, systems, properties)
        return await self.queue.submit(ComputeRequest("model", tuple(systems), properties))


def serve(backend, scenario: Callable, policy: BatchPolicy | None = None):
    """``await scenario(served)`` on a fresh loop, with a queue over ``backend``; returns
    (its return value, served)."""
    served = Served(backend, policy) if policy else Served(backend)
    lanes = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    async def main():
        served.start(lanes)
        return await scenario(served)

    try:
        return asyncio.run(main()), served
    finally:
        for lane in lanes:
            lane.shutdown()


async def collect(options, structures, evaluate, **kwargs) -> list:
    async with aclosing(run_workflow(options, structures, evaluate, **kwargs)) as events:
        return [event async for event in events]


def results_by_index(events: list) -> dict:
    """Results by structure index; fails on any StructureError or a missing summary."""
    errors = [e for e in events if isinstance(e, StructureError)]
    assert not errors, errors
    assert isinstance(events[-1], WorkflowSummary) and events[-1].failed == 0
    return {e.index: e.result for e in events if isinstance(e, StructureResult)}


def run_served(backend, options, atoms_list: list[Atoms]) -> list:
    """The workflow through the engine and a queue over ``backend``: results in input order."""
    from mlipserve_client.convert import system_from_atoms

    systems = [system_from_atoms(a) for a in atoms_list]
    events, _ = serve(backend, lambda served: collect(options, systems, served.evaluate))
    by_index = results_by_index(events)
    return [by_index[i] for i in range(len(systems))]


# --- local references: the libraries with the model's own calculator, sequentially ---------------


def relax_local(atoms: Atoms, calc, options: RelaxOptions) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if options.relax_cell else atoms
    {"FIRE": FIRE, "BFGS": BFGS}[options.optimizer](target, logfile=None).run(fmax=options.fmax,
                                                                             steps=options.max_steps)
    return atoms


def eos_local(atoms: Atoms, calc, options: EOSOptions) -> tuple[float, float, float]:
    """(v0, b0 in GPa, b0')"""
    atoms = relax_local(atoms, calc, options.relax)
    volumes, energies = [], []
    for strain in np.linspace(-options.max_abs_strain, options.max_abs_strain, options.n_points):
        point = atoms.copy()
        point.set_cell(atoms.cell.array * (1 + strain), scale_atoms=True)
        point.calc = calc
        if options.relax_points:
            point = relax_local(point, calc, RelaxOptions(relax_cell=False, fmax=options.relax.fmax))
        volumes.append(point.get_volume())
        energies.append(point.get_potential_energy())
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, _, bulk_modulus = eos.fit()
    return v0, bulk_modulus / units.GPa, eos.eos_parameters[2]


def elastic_local(atoms: Atoms, calc, options: ElasticOptions):
    """pymatgen's ElasticTensor, as matcalc's ElasticityCalc builds it."""
    from pymatgen.analysis.elasticity import DeformedStructureSet, ElasticTensor, Strain, Stress
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = relax_local(atoms, calc, options.relax)
    deformed = DeformedStructureSet(AseAtomsAdaptor.get_structure(atoms), options.norm_strains, options.shear_strains)
    stresses = []
    for structure in deformed:
        cell = AseAtomsAdaptor.get_atoms(structure)
        cell.calc = calc
        if options.relax_deformed:
            cell = relax_local(cell, calc, RelaxOptions(relax_cell=False, fmax=options.relax.fmax))
        stresses.append(Stress(voigt_6_to_full_3x3_stress(cell.get_stress()) / units.GPa))
    strains = [Strain.from_deformation(d) for d in deformed.deformations]
    eq_stress = Stress(voigt_6_to_full_3x3_stress(atoms.get_stress()) / units.GPa)
    return ElasticTensor.from_independent_strains(strains, stresses, eq_stress=eq_stress)


def phonons_local(atoms: Atoms, calc, options: PhononOptions):
    """phonopy with the primitive cell it finds itself; returns the Phonopy object with force constants."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms
    from phonopy.structure.cells import guess_primitive_matrix

    atoms = relax_local(atoms, calc, options.relax)
    unitcell = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                            scaled_positions=atoms.get_scaled_positions())
    phonon = Phonopy(unitcell, supercell_matrix=np.diag(options.supercell),
                     primitive_matrix=guess_primitive_matrix(unitcell))
    phonon.generate_displacements(distance=options.displacement)
    forces = []
    for supercell in phonon.supercells_with_displacements:
        displaced = Atoms(supercell.symbols, cell=supercell.cell, scaled_positions=supercell.scaled_positions,
                          pbc=True)
        displaced.calc = calc
        forces.append(displaced.get_forces())
    phonon.forces = forces
    phonon.produce_force_constants(show_drift=False)
    return phonon

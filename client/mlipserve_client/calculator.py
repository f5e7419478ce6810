"""RemoteCalculator: an ASE Calculator whose model runs on an mlipserve server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from mlipserve_client import convert
from mlipserve_client.client import DEFAULT_TIMEOUT_S, MLIPClient
from mlipserve_client.errors import ServiceError
from mlipserve_client.session import Session
from mlipserve_client.types import Correction, Property, System

# ASE asks for one property at a time (forces, then energy); asking the server for energy and forces
# together costs one backward pass and saves a round trip per MD step.
_ALWAYS = {Property.ENERGY, Property.FORCES}
_ASE_TO_PROPERTY = {
    "energy": Property.ENERGY,
    "free_energy": Property.ENERGY,
    "forces": Property.FORCES,
    "stress": Property.STRESS,
    "energies": Property.ENERGIES,
    "magmoms": Property.MAGMOMS,
    "charges": Property.CHARGES,
}


class RemoteCalculator(Calculator):
    """Energies, forces and stress from ``model`` served at ``address`` ("host:port").

    Drop-in for a local calculator: works with ASE MD, optimizers and cell filters. ``task`` picks a
    head or fidelity of multi-task models; ``corrections`` (Electrostatics, Dispersion) are added at
    serving time. ``token`` (default: $MLIPSERVE_TOKEN) and ``tls`` (True, or the root certificate's
    PEM path) are MLIPClient's; pass ``client=`` for mutual TLS. ``timeout`` (s) bounds each call,
    retries included; errors raise ServiceError (an ASE CalculationFailed) or ServiceInputError (also
    an ASE InputError) carrying the gRPC status and the server's message.

    One round trip per geometry: energy and forces always come together, and for a cell periodic in
    three dimensions the stress too (``stress_with_forces=False`` to skip it), so that an NPT step's
    ``get_stress`` after ``get_forces`` is answered from the cache. ``stream``: True for an MD
    session (one Simulate stream: only positions travel per step, and the server may keep the
    neighbour list), False for unary Compute calls, None (default) for a session where the server
    offers one. A session broken by a restart or a lost replica is reopened transparently.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies", "magmoms", "charges"]

    def __init__(
        self,
        address: str,
        model: str,
        *,
        task: str = "",
        corrections: Sequence[Correction] = (),
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls: bool | str | Path | bytes | None = None,
        stream: bool | None = None,
        stress_with_forces: bool = True,
        client: MLIPClient | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # parameters are what ASE writes into trajectories and uses in todict(): JSON-safe values only.
        self.parameters.update(address=address, model=model, timeout=timeout)
        if task:
            self.parameters["task"] = task
        if corrections:
            self.parameters["corrections"] = [c.name for c in corrections]
        self.task = task
        self.corrections = tuple(corrections)
        self.stream = stream
        self.stress_with_forces = stress_with_forces
        self.round_trips = 0  # calls to the server: Compute calls and session steps
        self._session: Session | None = None
        self._session_key: tuple | None = None
        # token and tls go to the client only: parameters end up in trajectory files.
        self.client = client or MLIPClient(address, model=model, timeout=timeout, token=token, tls=tls)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        wanted = _ALWAYS | {_ASE_TO_PROPERTY[p] for p in properties}
        if Property.STRESS in wanted and self.atoms.cell.rank < 3:
            raise PropertyNotImplementedError("stress needs a cell with three independent vectors")
        if self.stress_with_forces and self.atoms.cell.rank == 3 and self.atoms.pbc.all():
            wanted |= {Property.STRESS}
        system = convert.system_from_atoms(self.atoms)
        result = self._step(system, wanted) if self.stream is not False else None
        if result is None:
            (result,) = self.client.compute(system, wanted, model=self.parameters["model"], task=self.task,
                                            corrections=self.corrections)
        self.round_trips += 1
        self.results = result.as_ase_results()
        # Each correction's energy (eV, already in "energy"), e.g. {"d3(bj)-pbe": -0.42}.
        self.results["corrections"] = dict(result.corrections)

    def _step(self, system: System, wanted: frozenset[Property]):
        """The result through this calculator's session (opened, or reopened for another system), or
        None where the server has no sessions and ``stream`` is None."""
        key = (system.numbers.tobytes(), system.pbc.tobytes(), system.total_charge, system.spin_multiplicity,
               None if system.atomic_charges is None else system.atomic_charges.tobytes(), system.cell is None)
        if self._session is None or key != self._session_key or not wanted <= self._session.properties:
            properties = wanted | (self._session.properties if self._session and key == self._session_key else set())
            self._close_session()
            try:
                self._session = self.client.session(system, frozenset(properties), model=self.parameters["model"],
                                                    task=self.task, corrections=self.corrections)
            except ServiceError as error:
                if error.code is grpc.StatusCode.UNIMPLEMENTED and self.stream is None:
                    self.stream = False  # an older server: unary calls from now on
                    return None
                raise
            self._session_key = key
        return self._session.step(system.positions, system.cell)

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def close(self) -> None:
        self._close_session()
        self.client.close()

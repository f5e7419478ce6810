"""RemoteCalculator: an ASE Calculator whose model runs on an mlipserve server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from mlipserve_client.client import DEFAULT_TIMEOUT_S, MLIPClient
from mlipserve_client.types import Correction, Property

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
        # token and tls go to the client only: parameters end up in trajectory files.
        self.client = client or MLIPClient(address, model=model, timeout=timeout, token=token, tls=tls)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        wanted = _ALWAYS | {_ASE_TO_PROPERTY[p] for p in properties}
        if Property.STRESS in wanted and self.atoms.cell.rank < 3:
            raise PropertyNotImplementedError("stress needs a cell with three independent vectors")
        (result,) = self.client.compute(self.atoms, wanted, model=self.parameters["model"], task=self.task,
                                        corrections=self.corrections)
        self.results = result.as_ase_results()
        # Each correction's energy (eV, already in "energy"), e.g. {"d3(bj)-pbe": -0.42}.
        self.results["corrections"] = dict(result.corrections)

    def close(self) -> None:
        self.client.close()

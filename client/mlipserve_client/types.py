"""The currency of mlipserve: typed systems, requests, results and model metadata.

numpy only: the server's backends and physics use these too, and must not need grpc or protobuf.
Units: Å, eV, eV/Å, eV/Å³, e (see protos/mlipserve/v1/system.proto).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Property(str, enum.Enum):
    """A computable property, named as ASE names it."""

    ENERGY = "energy"
    FORCES = "forces"
    STRESS = "stress"
    ENERGIES = "energies"
    MAGMOMS = "magmoms"
    CHARGES = "charges"


DEFAULT_PROPERTIES = frozenset({Property.ENERGY, Property.FORCES})


@dataclass(frozen=True, eq=False)
class System:
    """One molecule, slab or crystal. Arrays are read-only views owned by this object."""

    numbers: np.ndarray  # (n,) int64 atomic numbers
    positions: np.ndarray  # (n, 3) float64, Å
    cell: np.ndarray | None  # (3, 3) float64 rows a, b, c in Å; None for an isolated system
    pbc: np.ndarray  # (3,) bool
    total_charge: float = 0.0  # e
    spin_multiplicity: int = 0  # 2S+1; 0 = the model's default
    atomic_charges: np.ndarray | None = None  # (n,) e, optional; sums to total_charge

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def is_periodic(self) -> bool:
        return bool(self.pbc.any())


@dataclass(frozen=True)
class Electrostatics:
    """Long-range Coulomb energy of partial charges (see compute.proto for the choices)."""

    method: str = "auto"  # auto | pme | ewald | direct
    charges: str = "auto"  # auto | request | model | qeq
    exclusion_radius: float | None = None  # Å; None: the model's cutoff; 0: nothing excluded

    @property
    def name(self) -> str:
        return f"electrostatics({self.method}, {self.charges})"


@dataclass(frozen=True)
class Dispersion:
    """Grimme's D3 dispersion."""

    functional: str = "pbe"
    damping: str = "bj"  # bj | zero
    cutoff: float | None = None  # Å; None: 40 bohr

    @property
    def name(self) -> str:
        return f"d3({self.damping})-{self.functional}"


Correction = Electrostatics | Dispersion


@dataclass(frozen=True, eq=False)
class ComputeRequest:
    """What a client asks of one model for one or more systems."""

    model: str
    systems: tuple[System, ...]
    properties: frozenset[Property] = DEFAULT_PROPERTIES
    task: str = ""  # "" = the model's default task
    corrections: tuple[Correction, ...] = ()
    # An MD session's id (its one system): the model replica may keep state for it between steps.
    session: str = ""

    @property
    def n_atoms(self) -> int:
        return sum(s.n_atoms for s in self.systems)


# Result fields that are arrays, by their Property name.
ARRAY_PROPERTIES = ("forces", "stress", "energies", "magmoms", "charges")


@dataclass(eq=False)
class Result:
    """Properties of one system; None where not requested (or, for stress, where there is no cell)."""

    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n, 3) eV/Å
    stress: np.ndarray | None = None  # (6,) eV/Å³, Voigt xx yy zz yz xz xy, ASE sign
    energies: np.ndarray | None = None  # (n,) eV
    magmoms: np.ndarray | None = None  # (n,) μB
    charges: np.ndarray | None = None  # (n,) e
    # Energy of each correction applied (eV), by name, in order; already included in ``energy``.
    corrections: dict[str, float] = field(default_factory=dict)
    # The version of the model that computed it (ComputeResponse.model_version): during an upgrade
    # in place, which side of the switch answered.
    model_version: str = ""

    def as_ase_results(self) -> dict[str, float | np.ndarray]:
        """The ``Calculator.results`` dict ASE expects (energy doubles as free_energy)."""
        out: dict[str, float | np.ndarray] = {}
        if self.energy is not None:
            out["energy"] = out["free_energy"] = self.energy
        for name in ARRAY_PROPERTIES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class ModelStatus(str, enum.Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ModelInfo:
    """What a served model is and can do (proto: mlipserve.v1.ModelInfo)."""

    id: str
    architecture: str
    version: str = ""
    cutoff: float = 0.0  # Å
    elements: tuple[int, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    num_parameters: int = 0
    training_data: str = ""
    license: str = ""
    trained: bool = True
    properties: frozenset[Property] = DEFAULT_PROPERTIES
    uses_total_charge: bool = False
    uses_spin: bool = False
    status: ModelStatus = ModelStatus.AVAILABLE
    status_message: str = ""
    tasks: tuple[str, ...] = ()
    default_task: str = ""
    corrections: tuple[Correction, ...] = ()

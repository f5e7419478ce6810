"""Options, results and progress events of the property workflows (relax, EOS, elastic, phonons,
diatomics), as plain dataclasses.

numpy, ase and the stdlib only: the server's workflow engine produces these, and the thin client
returns them. ``to_dict()`` gives JSON-ready dicts (arrays as nested lists, non-finite numbers as
None) and ``from_dict()`` reads them back (options given as JSON, say). Units: Å, eV, eV/Å, eV/Å³
for stress, GPa for moduli, THz for phonon frequencies. Also here, because client and server must
agree on them: the dimers a Diatomics request scans, and how the events of a run over some of the
structures (a resumed call) read as events of all of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, covalent_radii

from mlipserve_client.errors import InvalidSystemError
from mlipserve_client.types import System

OPTIMIZERS = ("FIRE", "BFGS")


def _plain(value):
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def from_plain(hint, value):
    """``value`` from JSON as the type ``hint`` names (to_dict's None back to NaN where a float is due)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # every union here is "X | None"
        return from_plain(hint, value)
    if isinstance(hint, type) and issubclass(hint, _Record):
        return hint.from_dict(value)
    if hint is np.ndarray:
        array = np.asarray(value)
        return array.astype(np.float64) if array.dtype == object else array
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        items = [from_plain(args[0], v) for v in value]
        return items if origin is list else tuple(items)
    if origin is tuple:
        return tuple(from_plain(a, v) for a, v in zip(args, value, strict=True))
    if hint is float:
        return math.nan if value is None else float(value)
    return hint(value)


class _Record:
    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("json", True)}

    @classmethod
    def from_dict(cls, data: dict):
        """The inverse of ``to_dict``; keys left out take their defaults."""
        fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise InvalidSystemError(unknown[0], f"not a field of {cls.__name__}; its fields: "
                                                 f"{', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: from_plain(hints[name], value) for name, value in data.items()})


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidSystemError(f"options.{name}", message)


# --- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelaxOptions(_Record):
    """ASE's optimizer on the atoms, or on a FrechetCellFilter of them when the cell relaxes too."""

    optimizer: str = "FIRE"  # FIRE | BFGS (ase.optimize)
    fmax: float = 0.05  # eV/Å; with the cell, the filter's scaled virial counts too
    max_steps: int = 500
    relax_cell: bool = True  # fully periodic systems only; others relax positions
    fix_symmetry: bool = False  # ase.constraints.FixSymmetry on the starting structure's space group
    symprec: float = 0.01  # FixSymmetry's tolerance (Å)
    pressure_gpa: float = 0.0  # FrechetCellFilter's scalar_pressure

    def __post_init__(self) -> None:
        _require(self.optimizer in OPTIMIZERS, "optimizer",
                 f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}")
        _require(self.fmax > 0, "fmax", f"must be > 0 eV/Å, got {self.fmax}")
        _require(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        _require(self.symprec > 0, "symprec", f"must be > 0 Å, got {self.symprec}")


@dataclass(frozen=True)
class EOSOptions(_Record):
    """Relax, scale the cell isotropically by linear strains in ±``max_abs_strain`` and fit
    Birch–Murnaghan (ase.eos) to the energies."""

    relax: RelaxOptions | None = RelaxOptions()
    n_points: int = 11
    max_abs_strain: float = 0.05  # linear: volumes span (1 ± 0.05)³ V
    relax_points: bool = False  # relax positions at each volume (fixed cell), as matcalc can

    def __post_init__(self) -> None:
        _require(self.n_points >= 5, "n_points", f"a 4-parameter fit needs >= 5 volumes, got {self.n_points}")
        _require(0 < self.max_abs_strain < 0.5, "max_abs_strain", f"must be in (0, 0.5), got {self.max_abs_strain}")


@dataclass(frozen=True)
class ElasticOptions(_Record):
    """Relax, deform by pymatgen's DeformedStructureSet, fit its ElasticTensor to the stresses."""

    relax: RelaxOptions | None = RelaxOptions()
    norm_strains: tuple[float, ...] = (-0.01, -0.005, 0.005, 0.01)
    shear_strains: tuple[float, ...] = (-0.06, -0.03, 0.03, 0.06)
    relax_deformed: bool = False  # relax positions in each deformed cell: relaxed-ion constants

    def __post_init__(self) -> None:
        for name in ("norm_strains", "shear_strains"):
            strains = getattr(self, name)
            _require(len(strains) >= 1 and all(s != 0 for s in strains), name,
                     f"give one or more non-zero strains, got {list(strains)}")


@dataclass(frozen=True)
class PhononOptions(_Record):
    """Relax, then phonopy's finite displacements, a seekpath band path, DOS and thermal properties."""

    relax: RelaxOptions | None = RelaxOptions()
    supercell: tuple[int, int, int] | None = None  # None: each supercell height >= min_supercell_length
    min_supercell_length: float = 10.0  # Å
    displacement: float = 0.01  # Å
    band_points: int = 51  # q-points of the longest segment (phonopy's constant interval)
    mesh: tuple[int, int, int] = (20, 20, 20)  # for DOS and thermal properties
    t_min: float = 0.0  # K
    t_max: float = 1000.0
    t_step: float = 10.0

    def __post_init__(self) -> None:
        _require(self.supercell is None or (len(self.supercell) == 3 and min(self.supercell) >= 1), "supercell",
                 f"give three positive repetitions, got {self.supercell}")
        _require(len(self.mesh) == 3 and min(self.mesh) >= 1, "mesh", f"give three positive divisions, got {self.mesh}")
        _require(self.displacement > 0, "displacement", f"must be > 0 Å, got {self.displacement}")
        _require(self.band_points >= 2, "band_points", f"must be >= 2, got {self.band_points}")
        _require(0 <= self.t_min <= self.t_max and self.t_step > 0, "t_step",
                 f"need 0 <= t_min <= t_max and t_step > 0, got {self.t_min}, {self.t_max}, {self.t_step}")


@dataclass(frozen=True)
class DiatomicOptions(_Record):
    """An energy curve of a dimer in vacuum over distances, as MLIP Arena scans them: from
    ``r_min_factor`` x the mean covalent radius to ``r_max_factor`` x the larger van der Waals radius
    (6 Å where unknown) in steps of ``step``; or the given ``distances``."""

    r_min_factor: float = 0.9
    r_max_factor: float = 3.1
    step: float = 0.01  # Å
    distances: tuple[float, ...] | None = None  # Å
    force_tolerance: float = 1e-2  # eV/Å: smaller forces count as zero when sign flips are counted
    energy_tolerance: float = 1e-3  # eV: smaller energy steps count as flat when flips are counted

    def __post_init__(self) -> None:
        _require(self.step > 0, "step", f"must be > 0 Å, got {self.step}")
        _require(self.distances is None or (len(self.distances) >= 3 and min(self.distances) > 0), "distances",
                 "give three or more positive distances")


WorkflowOptions = RelaxOptions | EOSOptions | ElasticOptions | PhononOptions | DiatomicOptions


# --- results -------------------------------------------------------------------------------------


@dataclass(eq=False)
class RelaxResult(_Record):
    numbers: np.ndarray  # (n,)
    positions: np.ndarray  # (n, 3) Å
    cell: np.ndarray | None  # (3, 3) Å; None for an isolated system
    pbc: np.ndarray  # (3,)
    energy: float  # eV
    forces: np.ndarray  # (n, 3) eV/Å
    stress: np.ndarray | None  # (6,) eV/Å³, ASE sign, Voigt; None without periodicity
    steps: int
    converged: bool
    max_force: float  # eV/Å, largest atomic force at the end

    def atoms(self) -> Atoms:
        """The relaxed structure, its energy, forces and stress on a SinglePointCalculator."""
        atoms = Atoms(numbers=self.numbers, positions=self.positions,
                      cell=self.cell if self.cell is not None else np.zeros((3, 3)), pbc=self.pbc)
        results = {"energy": self.energy, "free_energy": self.energy, "forces": self.forces}
        if self.stress is not None:
            results["stress"] = self.stress
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


@dataclass(eq=False)
class EOSResult(_Record):
    v0: float  # Å³, of the structure as given (all its atoms)
    e0: float  # eV
    b0_gpa: float
    b0_prime: float
    volumes: np.ndarray  # Å³, the E–V points fitted
    energies: np.ndarray  # eV
    bracketed: bool  # v0 lies inside the scanned volumes (else the fit extrapolates)
    relaxed: RelaxResult | None = None


@dataclass(eq=False)
class ElasticResult(_Record):
    tensor_gpa: np.ndarray  # (6, 6) C_ij, Voigt order xx yy zz yz xz xy
    k_voigt_gpa: float
    k_reuss_gpa: float
    k_vrh_gpa: float
    g_voigt_gpa: float
    g_reuss_gpa: float
    g_vrh_gpa: float
    strains: np.ndarray  # (m, 6) the Green–Lagrange strains applied, Voigt (engineering shear)
    stresses_gpa: np.ndarray  # (m, 6) their stresses, ASE sign
    relaxed: RelaxResult | None = None


@dataclass(eq=False)
class PhononResult(_Record):
    supercell: np.ndarray  # (3, 3) supercell matrix
    n_displacements: int
    gamma_thz: np.ndarray  # (3 n_primitive,) frequencies at Γ; imaginary ones negative
    band_labels: list[str]  # seekpath's labels at the path's segment ends (phonopy's order)
    band_connections: list[bool]  # segment k continues into k+1
    band_distances: list[np.ndarray]  # per segment, (m_k,) path length, 1/Å
    band_frequencies_thz: list[np.ndarray]  # per segment, (m_k, 3 n_primitive)
    dos_frequencies_thz: np.ndarray
    dos: np.ndarray  # states/THz per primitive cell
    temperatures_k: np.ndarray
    free_energy_kj_mol: np.ndarray  # Helmholtz, per mole of unit cells (phonopy's units)
    entropy_j_k_mol: np.ndarray
    heat_capacity_j_k_mol: np.ndarray  # C_v
    relaxed: RelaxResult | None = None


@dataclass(eq=False)
class DiatomicChecks(_Record):
    """MLIP Arena's checks of a curve ordered from far to near, energies relative to the farthest."""

    equilibrium_distance: float  # Å, where the energy is lowest
    well_depth: float  # eV, farthest energy minus the lowest
    force_flips: int  # sign changes of the bond force (1 for a physical curve)
    energy_diff_flips: int  # sign changes of successive energy steps (1: one minimum, smooth)
    energy_jump: float  # eV, size of the steps around those flips
    tortuosity: float  # energy's total variation over its minimal one (1: monotone on each side)
    conservation_deviation: float  # eV/Å, mean |F + dE/dr|
    spearman_repulsion: float | None  # rank correlation of E with r inside the minimum (-1 ideal)
    spearman_attraction: float | None  # outside the minimum (+1 ideal)


@dataclass(eq=False)
class DiatomicResult(_Record):
    numbers: tuple[int, int]
    distances: np.ndarray  # Å, ascending
    energies: np.ndarray  # eV
    forces: np.ndarray  # eV/Å, on the second atom along the bond: positive repels
    checks: DiatomicChecks


WorkflowResult = RelaxResult | EOSResult | ElasticResult | PhononResult | DiatomicResult


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureProgress(_Record):
    index: int  # in the request's structures
    stage: str  # e.g. "relax", "eos", "displacements"
    step: int  # optimizer steps taken in this stage
    max_force: float | None  # eV/Å at the latest evaluation


@dataclass(frozen=True)
class WorkflowProgress(_Record):
    workflow: str
    done: int  # structures finished, failed ones included
    failed: int
    total: int
    elapsed_s: float
    eta_s: float | None  # None until a structure has finished
    structures: tuple[StructureProgress, ...]  # those in flight


@dataclass(frozen=True, eq=False)
class StructureResult(_Record):
    index: int
    result: WorkflowResult


@dataclass(frozen=True, eq=False)
class StructureError(_Record):
    """One structure failed; the others go on. ``field`` names it, e.g. ``structures[3].positions[0]``."""

    index: int
    field: str
    message: str
    error_type: str  # the exception's class name
    error: BaseException | None = dataclasses.field(default=None, repr=False, metadata={"json": False})
    code: str = ""  # the gRPC status code name it maps to, e.g. INVALID_ARGUMENT (set by the server)


@dataclass(frozen=True)
class WorkflowSummary(_Record):
    workflow: str
    total: int
    succeeded: int
    failed: int
    elapsed_s: float
    evaluations: int  # requests sent to the model's queue
    systems_evaluated: int


WorkflowEvent = WorkflowProgress | StructureResult | StructureError | WorkflowSummary


def dimer(numbers: Sequence[int], r: float, charge: float = 0.0, spin: int = 0) -> System:
    """Two atoms ``r`` Å apart along x, in vacuum."""
    return System(numbers=np.asarray(numbers, dtype=np.int64), positions=np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]),
                  cell=None, pbc=np.zeros(3, dtype=bool), total_charge=charge, spin_multiplicity=spin)


def diatomic_systems(elements: Iterable[int | str], heteronuclear: bool = False) -> list[System]:
    """The structures a Diatomics request runs on, in its order: each element with itself by atomic
    number (with ``heteronuclear`` every pair Z1 <= Z2), at the sum of covalent radii; the workflow
    scans the distance."""
    numbers = set()
    for i, element in enumerate(elements):
        number = int(element) if isinstance(element, int | np.integer) else atomic_numbers.get(element)
        if number is None or not 1 <= number <= 118:
            raise InvalidSystemError(f"elements[{i}]", f"{element!r} is not an element symbol (e.g. H, Ge, Te)")
        numbers.add(number)
    ordered = sorted(numbers)
    pairs = itertools.combinations_with_replacement(ordered, 2) if heteronuclear else ((z, z) for z in ordered)
    return [dimer(pair, float(covalent_radii[pair[0]] + covalent_radii[pair[1]])) for pair in pairs]


def _reroot(field: str, indices: Sequence[int]) -> str:
    return re.sub(r"^structures\[(\d+)\]", lambda m: f"structures[{indices[int(m.group(1))]}]", field)


def reindexed(event: WorkflowEvent, indices: Sequence[int], done: int = 0, failed: int = 0,
              total: int | None = None) -> WorkflowEvent:
    """An event of a run over some of the structures (its k-th is ``indices[k]`` of all ``total``),
    as an event of the whole: indices and fields mapped, and ``done`` structures finished outside
    the run (``failed`` of them failed) counted in."""
    total = len(indices) + done if total is None else total
    if isinstance(event, WorkflowProgress):
        return dataclasses.replace(event, done=event.done + done, failed=event.failed + failed, total=total,
                                   structures=tuple(dataclasses.replace(s, index=indices[s.index])
                                                    for s in event.structures))
    if isinstance(event, StructureError):
        return dataclasses.replace(event, index=indices[event.index], field=_reroot(event.field, indices))
    if isinstance(event, StructureResult):
        return dataclasses.replace(event, index=indices[event.index])
    return dataclasses.replace(event, total=total, succeeded=event.succeeded + done - failed,
                               failed=event.failed + failed)

"""The workflows' wire format (convert_workflows round trips, no server) and the mlipserve-client
command against the session server: structure files in, JSON and PNG plots out."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.io import write
from frontdoor_harness import MACE_LOAD_WARNING

from mlipserve_client.cli import main
from mlipserve_client.convert_workflows import (
    event_from_proto,
    event_to_proto,
    options_from_proto,
    options_to_proto,
    result_from_proto,
    result_to_proto,
)
from mlipserve_client.plots import DPI, FIGSIZE
from mlipserve_client.workflow_types import (
    DiatomicChecks,
    DiatomicOptions,
    DiatomicResult,
    ElasticOptions,
    ElasticResult,
    EOSOptions,
    EOSResult,
    PhononOptions,
    PhononResult,
    RelaxOptions,
    RelaxResult,
    StructureError,
    StructureProgress,
    StructureResult,
    WorkflowProgress,
    WorkflowSummary,
)

PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


# --- the wire format -------------------------------------------------------------------------------


OPTIONS = [
    RelaxOptions(optimizer="BFGS", fmax=0.01, max_steps=7, relax_cell=False, fix_symmetry=True, symprec=0.1,
                 pressure_gpa=1.5),
    EOSOptions(relax=None, n_points=7, max_abs_strain=0.03, relax_points=True),
    ElasticOptions(relax=RelaxOptions(fmax=0.02), norm_strains=(-0.01, 0.01), shear_strains=(0.02,),
                   relax_deformed=True),
    PhononOptions(supercell=(2, 3, 4), min_supercell_length=8.0, displacement=0.02, band_points=5, mesh=(3, 3, 3),
                  t_min=10.0, t_max=300.0, t_step=5.0),
    DiatomicOptions(r_min_factor=0.8, r_max_factor=2.0, step=0.1, distances=(1.0, 2.0, 3.0), force_tolerance=0.1,
                    energy_tolerance=0.01),
    RelaxOptions(), EOSOptions(), ElasticOptions(), PhononOptions(), DiatomicOptions(),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: type(o).__name__)
def test_options_round_trip(options):
    assert options_from_proto(options_to_proto(options)) == options
    assert type(options).from_dict(json.loads(json.dumps(options.to_dict()))) == options


def results(rng: np.random.Generator) -> list:
    relaxed = RelaxResult(numbers=np.array([14, 14]), positions=rng.random((2, 3)), cell=np.eye(3) * 5.4,
                          pbc=np.ones(3, dtype=bool), energy=-10.8, forces=rng.random((2, 3)), stress=rng.random(6),
                          steps=12, converged=True, max_force=0.01)
    molecule_relaxed = RelaxResult(numbers=np.array([8, 1, 1]), positions=rng.random((3, 3)), cell=None,
                                   pbc=np.zeros(3, dtype=bool), energy=-14.2, forces=rng.random((3, 3)), stress=None,
                                   steps=3, converged=False, max_force=0.3)
    return [
        relaxed, molecule_relaxed,
        EOSResult(v0=40.1, e0=-10.9, b0_gpa=97.0, b0_prime=4.2, volumes=rng.random(7), energies=rng.random(7),
                  bracketed=False, relaxed=relaxed),
        ElasticResult(tensor_gpa=rng.random((6, 6)), k_voigt_gpa=1.0, k_reuss_gpa=2.0, k_vrh_gpa=3.0, g_voigt_gpa=4.0,
                      g_reuss_gpa=5.0, g_vrh_gpa=6.0, strains=rng.random((24, 6)), stresses_gpa=rng.random((24, 6))),
        PhononResult(supercell=np.diag([2, 2, 2]), n_displacements=1, gamma_thz=rng.random(6),
                     band_labels=["$\\Gamma$", "X", "U", "K", "$\\Gamma$"], band_connections=[True, False, False],
                     band_distances=[rng.random(4), rng.random(3), rng.random(5)],
                     band_frequencies_thz=[rng.random((4, 6)), rng.random((3, 6)), rng.random((5, 6))],
                     dos_frequencies_thz=rng.random(9), dos=rng.random(9), temperatures_k=rng.random(4),
                     free_energy_kj_mol=rng.random(4), entropy_j_k_mol=rng.random(4),
                     heat_capacity_j_k_mol=rng.random(4), relaxed=relaxed),
        DiatomicResult(numbers=(32, 52), distances=rng.random(5), energies=rng.random(5), forces=rng.random(5),
                       checks=DiatomicChecks(equilibrium_distance=2.5, well_depth=1.2, force_flips=1,
                                             energy_diff_flips=1, energy_jump=0.0, tortuosity=float("nan"),
                                             conservation_deviation=0.01, spearman_repulsion=-1.0,
                                             spearman_attraction=None)),
    ]


def test_results_and_events_round_trip(rng):
    for result in results(rng):
        back = result_from_proto(result_to_proto(result))
        assert type(back) is type(result) and back.to_dict() == result.to_dict()
        assert type(result).from_dict(json.loads(json.dumps(result.to_dict()))).to_dict() == result.to_dict()
        event = event_from_proto(event_to_proto(StructureResult(3, result)))
        assert event.index == 3 and event.result.to_dict() == result.to_dict()
    assert results(rng)[0].atoms().get_stress().shape == (6,)
    for event in (WorkflowProgress("eos", 2, 1, 5, 1.5, None, (StructureProgress(0, "relax", 4, 0.2),
                                                                 StructureProgress(3, "eos", 0, None))),
                  WorkflowProgress("relax", 0, 0, 1, 0.0, 12.5, ()),
                  StructureError(4, "structures[4].positions[0]", "atom 0 has a non-finite position",
                                 "InvalidSystemError", code="INVALID_ARGUMENT"),
                  WorkflowSummary("relax", 10, 9, 1, 3.2, 40, 400)):
        assert event_from_proto(event_to_proto(event)).to_dict() == event.to_dict()


# --- the command line ------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    cif, frames = tmp_path / "si.cif", tmp_path / "frames.extxyz"
    write(cif, bulk("Si", "diamond", a=5.45))
    water = molecule("H2O")
    water.center(vacuum=4.0)
    water.pbc = False
    write(frames, [bulk("Cu", "fcc", a=3.60), bulk("Cu", "fcc", a=3.64), water])
    return {"cif": cif, "frames": frames}


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.integration
@pytest.mark.filterwarnings(MACE_LOAD_WARNING)
def test_cli_writes_json_and_plots(server, files, tmp_path, capsys):
    address = ["--address", server.address, "--quiet"]
    out, plots = tmp_path / "eos.json", tmp_path / "plots"
    eos = '{"relax": null, "n_points": 5}'
    rc = run_cli("eos", files["cif"], files["frames"], "--model", "chgnet-0.3.0", "--options", eos, "--out", out,
                 "--plot", plots, *address)
    assert rc == 1  # the molecule cannot have an equation of state; the crystals do
    report = json.loads(out.read_text())
    labels = [s["label"] for s in report["structures"]]
    assert labels == [str(files["cif"]), *(f"{files['frames']}@{k}" for k in range(3))]
    assert [("result" in s) for s in report["structures"]] == [True, True, True, False]
    assert report["structures"][3]["error"]["code"] == "INVALID_ARGUMENT"
    assert report["structures"][0]["result"]["b0_gpa"] > 50 and report["summary"]["succeeded"] == 3
    assert report["options"]["n_points"] == 5 and report["options"]["relax"] is None
    phonons = '{"relax": null, "supercell": [1, 1, 1], "mesh": [4, 4, 4], "band_points": 5}'
    assert run_cli("phonons", files["cif"], "--model", "chgnet-0.3.0", "--options", phonons, "--plot", plots,
                   *address) == 0
    assert run_cli("elastic", files["cif"], "--model", "chgnet-0.3.0", "--options", '{"relax": null}', "--plot",
                   plots, *address) == 0
    assert run_cli("diatomics", "Te", "--elements", "Ge", "--heteronuclear", "--model", "mace-gst", "--options",
                   '{"step": 0.2}', "--plot", plots, "--out", tmp_path / "dimers.json", *address) == 0
    dimers = json.loads((tmp_path / "dimers.json").read_text())
    assert [s["label"] for s in dimers["structures"]] == ["Ge–Ge", "Ge–Te", "Te–Te"]
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["diatomics.png", "elastic_0_si.cif.png", "eos_0_si.cif.png", "eos_1_frames.extxyz_0.png",
                    "eos_2_frames.extxyz_1.png", "phonons_0_si.cif.png"]
    for png in plots.iterdir():
        assert png_size(png) == PIXELS
    printed = capsys.readouterr().out
    assert "B0" in printed and "structures[3].pbc" in printed and "r_eq" in printed


@pytest.mark.integration
def test_cli_relax_reads_every_frame(server, files, tmp_path):
    out = tmp_path / "relax.json"
    assert run_cli("relax", files["frames"], "--model", "chgnet-0.3.0", "--options", '{"max_steps": 2}', "--out", out,
                   "--address", server.address, "--quiet") == 0
    results = [s["result"] for s in json.loads(out.read_text())["structures"]]
    assert [r["steps"] for r in results] == [2, 2, 2] and results[2]["stress"] is None
    assert RelaxResult.from_dict(results[0]).atoms().get_chemical_formula() == "Cu"


def test_cli_without_the_extra_says_how_to_install_it(monkeypatch, files, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert run_cli("eos", files["cif"], "--model", "m", "--plot", tmp_path, "--address", "127.0.0.1:9") == 2
    assert "pip install 'mlipserve-client[cli]'" in capsys.readouterr().err


def test_cli_refuses_bad_options_before_calling(files, capsys):
    assert run_cli("relax", files["cif"], "--model", "m", "--options", '{"fmax": -1}', "--address", "127.0.0.1:9") == 2
    assert "options.fmax: must be > 0" in capsys.readouterr().err


def test_the_script_is_installed():
    script = shutil.which("mlipserve-client", path=str(Path(sys.executable).parent))
    assert script is not None
    run = subprocess.run([script, "diatomics", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--heteronuclear" in run.stdout

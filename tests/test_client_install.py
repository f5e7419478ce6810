"""The thin client installs into a fresh venv without torch or ray and talks to a running server; so
does its ``cli`` extra (tqdm and matplotlib for mlipserve-client's progress bar and plots)."""

from __future__ import annotations

import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
from conftest import CHGNET_ID, si_diamond

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"


def test_client_installs_without_torch_or_ray_and_calls_the_server(tmp_path, server, client):
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(CLIENT_DIR)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               timeout=120).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "mlipserve-client" in names
    assert not names & {"torch", "ray", "chgnet", "mace-torch", "mlipserve"}, names

    script = textwrap.dedent(f"""
        import sys
        from ase.build import bulk
        from mlipserve_client import RemoteCalculator
        for banned in ("torch", "ray"):
            assert banned not in sys.modules
        atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
        atoms.rattle(stdev=0.03, seed=1)
        atoms.calc = RemoteCalculator("{server.address}", model="{CHGNET_ID}", timeout=120)
        print(repr(atoms.get_potential_energy()))
        for banned in ("torch", "ray"):
            assert banned not in sys.modules, banned
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (expected,) = client.compute(si_diamond(), ("energy",))
    assert float(run.stdout.strip()) == expected.energy

    extra = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{CLIENT_DIR}[cli]"],
                           capture_output=True, text=True, timeout=600)
    assert extra.returncode == 0, extra.stderr[-3000:]
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               timeout=120).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert {"tqdm", "matplotlib"} <= names and not names & {"torch", "ray", "mlipserve"}, names
    structure = tmp_path / "si.extxyz"
    si_diamond().write(structure)
    cli = subprocess.run([env_dir / "bin" / "mlipserve-client", "eos", str(structure), "--model", CHGNET_ID,
                          "--address", server.address, "--options", '{"relax": null, "n_points": 5}',
                          "--plot", str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "B0" in cli.stdout and (tmp_path / "plots" / "eos_0_si.extxyz.png").stat().st_size > 0

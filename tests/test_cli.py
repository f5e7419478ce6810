"""The mlipserve command: help, models, compute FILE, and serve with a clean shutdown on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from ase.io import write
from conftest import CHGNET_ID, ethanol_no_cell, nacl_rattled, si_diamond

from mlipserve.cli import main

MLIPSERVE = [sys.executable, "-m", "mlipserve.cli"]


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["models", "--help"], ["compute", "--help"]])
def test_help(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert "usage: mlipserve" in capsys.readouterr().out


@pytest.mark.integration
def test_models_lists_the_served_model(server, capsys):
    assert main(["models", "--address", server.address]) == 0
    out = capsys.readouterr().out
    assert CHGNET_ID in out and "CHGNet" in out and "available" in out


@pytest.mark.integration
def test_compute_prints_a_table_for_every_frame(server, client, tmp_path, capsys):
    path = tmp_path / "frames.extxyz"
    frames = [si_diamond(), nacl_rattled()]
    write(path, frames)
    assert main(["compute", str(path), "--address", server.address]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 2
    for row, atoms in zip(rows, frames, strict=True):
        (expected,) = client.compute(atoms, ("energy",))
        assert int(row[1]) == len(atoms)
        assert float(row[2]) == pytest.approx(expected.energy, abs=1e-5 * len(atoms))  # float32 model
        assert len(row) == 11  # frame, atoms, E, E/atom, max|F|, 6 stress components


@pytest.mark.integration
def test_compute_molecule_has_no_stress_and_errors_are_one_line(server, tmp_path, capsys):
    path = tmp_path / "ethanol.xyz"
    write(path, ethanol_no_cell())
    assert main(["compute", str(path), "--address", server.address]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "-"
    assert main(["compute", str(path), "--address", server.address, "--model", "nope"]) == 1
    assert "NOT_FOUND: unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_serve_starts_answers_and_stops_cleanly_on_sigterm(tmp_path):
    from mlipserve.runtime import free_port
    from mlipserve_client import MLIPClient

    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*MLIPSERVE, "serve", "--port", str(port), "--num-cpus", "1"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while f"serving gRPC at localhost:{port}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with MLIPClient(f"localhost:{port}", model=CHGNET_ID, timeout=60) as client:
            (result,) = client.compute(si_diamond(), ("energy", "forces"))
        assert result.forces.shape == (64, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "shutting down" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

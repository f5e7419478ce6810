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


def non_loopback_address() -> str:
    """An address of this machine other than loopback (where a server bound to 0.0.0.0 would be
    reachable), checked by listening on it."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    with socket.create_server((address, 0)) as listener:
        socket.create_connection(listener.getsockname(), timeout=2).close()
    return address


@pytest.mark.integration
@pytest.mark.slow
def test_serve_listens_on_loopback_only_and_drains_on_sigterm(tmp_path):
    """The quick start as a user runs it: `mlipserve serve` (CHGNet, local Ray). It is not reachable
    from another address of the machine; on SIGTERM a request in flight finishes, new calls are
    refused, and the process exits cleanly."""
    import socket
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

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
        while f"serving gRPC at 127.0.0.1:{port}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((non_loopback_address(), port), timeout=5)
        address = f"127.0.0.1:{port}"
        with MLIPClient(address, model=CHGNET_ID, timeout=60) as client:
            (result,) = client.compute(si_diamond(), ("energy", "forces"))
        assert result.forces.shape == (64, 3)
        assert "WARNING" not in log.read_text()  # loopback: nothing to warn about

        in_flight: list = []
        slow = threading.Thread(target=lambda: in_flight.append(
            MLIPClient(address, model=CHGNET_ID, timeout=60, retries=False).compute([si_diamond()] * 16)))
        slow.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        refused = None
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while refused is None and time.monotonic() < deadline + 60:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status != health_pb2.HealthCheckResponse.SERVING:
                        refused = "NOT_SERVING"
                except grpc.RpcError as error:
                    refused = error.code().name
                time.sleep(0.05)
        assert refused in ("NOT_SERVING", "UNAVAILABLE")
        slow.join(timeout=120)
        assert len(in_flight) == 1 and len(in_flight[0]) == 16  # the call in flight got its answer
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "draining" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_warns_loudly_when_exposed_without_tls_and_tokens(capsys):
    import argparse

    from mlipserve.cli import _server_config, _warn_if_exposed, load_service_config

    def config(*args):
        parsed = argparse.Namespace(host="0.0.0.0", port=None, tls_cert=None, tls_key=None, tls_client_ca=None,
                                    token_file=None)
        for name, value in args:
            setattr(parsed, name, value)
        return _server_config(load_service_config(None, None, None), parsed)

    _warn_if_exposed(config())
    err = capsys.readouterr().err
    assert "WARNING" in err and "without TLS (--tls-cert/--tls-key) and tokens (--token-file)" in err
    _warn_if_exposed(config(("host", "127.0.0.1")))
    assert capsys.readouterr().err == ""

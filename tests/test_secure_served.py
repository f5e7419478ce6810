"""TLS and tokens on the served path: an application on the session's Ray whose replicas' front
doors require both. A client with the CA and a token gets its answer; without the token it is
UNAUTHENTICATED; and none of Ray's logs of the whole session (the replicas', the controller's, the
driver's) contains the token."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from ase import Atoms
from frontdoor_harness import MACE_LOAD_WARNING, TINY_OPTIONS
from tls_certificates import make_material

from mlipserve.server.auth import hash_token
from mlipserve_client import MLIPClient
from mlipserve_client.errors import ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(MACE_LOAD_WARNING)]

TOKEN = "served-path-secret-5b1e9c0d7a"


def test_tls_and_tokens_through_ray_serve_and_no_token_in_any_log(server, tmp_path):
    import ray
    from ray import serve

    from mlipserve import runtime
    from mlipserve.config import DeploymentConfig, ModelConfig, ServerConfig, ServiceConfig

    certs = make_material(tmp_path)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"sha256:{hash_token(TOKEN)}\n")
    port = runtime.free_port()
    config = ServiceConfig(
        models=(ModelConfig(id="tiny", backend="mace", options=TINY_OPTIONS),),
        deployments={"mace": DeploymentConfig(num_cpus=0.25)},
        server=ServerConfig(port=port, tls_cert=str(certs.server.cert), tls_key=str(certs.server.key),
                            token_file=str(tokens)))
    runtime.deploy(config, name="secure")
    try:
        address = f"localhost:{port}"
        water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
        with MLIPClient(address, model="tiny", tls=certs.ca, token=TOKEN, timeout=60) as client:
            assert np.isfinite(client.compute(water)[0].energy)
            with client.session(water) as session:
                assert np.isfinite(session.step(water.positions).energy)
        with MLIPClient(address, model="tiny", tls=certs.ca, timeout=10, retries=False) as anonymous:
            with pytest.raises(ServiceError) as error:
                anonymous.compute(water)
        assert error.value.code is grpc.StatusCode.UNAUTHENTICATED
        with MLIPClient(address, model="tiny", tls=certs.ca, token=TOKEN + "x", timeout=10, retries=False) as wrong:
            with pytest.raises(ServiceError):
                wrong.compute(water)
    finally:
        serve.delete("secure")
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    leaking = [p.name for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaking

"""TLS, mutual TLS and bearer tokens at the front door, with certificates made in the test.

Each refusal is a clear failure on the client's side, and the server answers the next good call."""

from __future__ import annotations

import dataclasses
import logging

import grpc
import numpy as np
import pytest
from ase import Atoms
from frontdoor_harness import MACE_LOAD_WARNING, TINY_IDS, LoopThread, running_front_door, tiny_host
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certificates import make_material

from mlipserve.config import ServerConfig, TokenEntry
from mlipserve.server.auth import hash_token, load_token_file, tokens_from_env
from mlipserve_client import MLIPClient
from mlipserve_client.errors import ServiceError

pytestmark = pytest.mark.filterwarnings(MACE_LOAD_WARNING)

MODEL, OTHER_MODEL = TINY_IDS
TOKEN = "s3cret-token-for-alice-7f1c"  # found nowhere in the logs (test below)
SCOPED = "token-of-bob-scoped-to-b-91e2"
SLOW = "token-of-carol-rate-limited-44d0"


def water() -> Atoms:
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.center(vacuum=4.0)
    return atoms


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def host(loop):
    host = tiny_host(loop)
    yield host
    loop.run(host.aclose())


@pytest.fixture(scope="module")
def reference(host, loop):
    (result,) = loop.run(host.compute(_request(water())))
    return result


def _request(atoms: Atoms):
    from mlipserve_client import convert
    from mlipserve_client.types import ComputeRequest

    return ComputeRequest(MODEL, (convert.system_from_atoms(atoms),))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("tls"))


def _compute(address: str, **client_options) -> float:
    client_options.setdefault("timeout", 10)
    with MLIPClient(address, model=MODEL, **client_options) as client:
        return client.compute(water(), ("energy", "forces"))[0].energy


def _fails(address: str, **client_options) -> ServiceError:
    with pytest.raises(ServiceError) as error:
        _compute(address, **client_options)
    return error.value


# --- TLS -------------------------------------------------------------------------------------------


def test_tls_server_answers_clients_that_trust_its_ca_and_refuses_the_others(loop, host, certs, reference):
    config = ServerConfig(tls_cert=str(certs.server.cert), tls_key=str(certs.server.key))
    with running_front_door(loop, host, config) as door:
        address = f"localhost:{door.port}"
        assert _compute(address, tls=certs.ca) == pytest.approx(reference.energy, abs=1e-12)
        # A client trusting another CA: the handshake fails, nothing is computed.
        assert _fails(address, tls=certs.other_ca, timeout=3).code is grpc.StatusCode.UNAVAILABLE
        # A plaintext client against the TLS port.
        assert _fails(address, timeout=3).code is grpc.StatusCode.UNAVAILABLE
        # ... and the server is still there for the right client.
        assert _compute(address, tls=certs.ca) == pytest.approx(reference.energy, abs=1e-12)


def test_expired_server_certificate_is_refused_by_the_client(loop, host, certs):
    config = ServerConfig(tls_cert=str(certs.expired_server.cert), tls_key=str(certs.expired_server.key))
    with running_front_door(loop, host, config) as door:
        assert _fails(f"localhost:{door.port}", tls=certs.ca, timeout=3).code is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(loop, host, certs, reference):
    config = ServerConfig(tls_cert=str(certs.server.cert), tls_key=str(certs.server.key),
                          tls_client_ca=str(certs.ca))
    with running_front_door(loop, host, config) as door:
        address = f"localhost:{door.port}"
        mine = dict(tls=certs.ca, tls_client_cert=certs.client.cert, tls_client_key=certs.client.key)
        assert _compute(address, **mine) == pytest.approx(reference.energy, abs=1e-12)
        assert _fails(address, tls=certs.ca, timeout=3).code is grpc.StatusCode.UNAVAILABLE
        intruder = dict(tls=certs.ca, tls_client_cert=certs.client_of_other_ca.cert,
                        tls_client_key=certs.client_of_other_ca.key)
        assert _fails(address, timeout=3, **intruder).code is grpc.StatusCode.UNAVAILABLE
        assert _compute(address, **mine) == pytest.approx(reference.energy, abs=1e-12)


def test_tls_needs_both_certificate_and_key():
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        ServerConfig(tls_cert="server.crt")
    with pytest.raises(ValueError, match="needs tls_cert"):
        ServerConfig(tls_client_ca="ca.crt")


# --- tokens ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_config(tmp_path_factory) -> ServerConfig:
    path = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    path.write_text(f"""tokens:
  - name: alice
    sha256: {hash_token(TOKEN)}
  - name: bob
    token: {SCOPED}
    models: [{OTHER_MODEL}]
  - name: carol
    sha256: {hash_token(SLOW)}
    requests_per_second: 0.2
    burst: 2
""")
    return ServerConfig(token_file=str(path))


def test_tokens_none_wrong_right_scoped_and_rate_limited(loop, host, token_config, reference):
    with running_front_door(loop, host, token_config) as door:
        address = door.address
        assert _fails(address, retries=False).code is grpc.StatusCode.UNAUTHENTICATED
        wrong = _fails(address, token=TOKEN[:-1] + "x", retries=False)
        assert wrong.code is grpc.StatusCode.UNAUTHENTICATED and TOKEN[:-1] not in wrong.details
        assert _compute(address, token=TOKEN) == pytest.approx(reference.energy, abs=1e-12)
        denied = _fails(address, token=SCOPED, retries=False)
        assert denied.code is grpc.StatusCode.PERMISSION_DENIED and "'bob'" in denied.details
        # bob may use his model, and ListModels shows him only that one.
        with MLIPClient(address, model=OTHER_MODEL, token=SCOPED, timeout=10) as bob:
            assert bob.compute(water())[0].energy == pytest.approx(reference.energy, abs=1e-12)
            assert [m.id for m in bob.list_models()] == [OTHER_MODEL]
        # carol: a burst of 2, then over her rate; the refusal says when to come back.
        with MLIPClient(address, model=MODEL, token=SLOW, timeout=10, retries=False) as carol:
            carol.compute(water())
            carol.compute(water())
            with pytest.raises(ServiceError) as limited:
                carol.compute(water())
        assert limited.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "requests/s" in limited.value.details
        # With retries (the default) the client waits as told and gets its answer.
        with MLIPClient(address, model=MODEL, token=SLOW, timeout=20) as patient:
            assert patient.compute(water())[0].energy == pytest.approx(reference.energy, abs=1e-12)
        assert _compute(address, token=TOKEN) == pytest.approx(reference.energy, abs=1e-12)


def test_health_and_reflection_need_no_token(loop, host, token_config):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with running_front_door(loop, host, token_config) as door, grpc.insecure_channel(door.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"mlipserve.v1.MLIPService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= services


def test_no_token_is_ever_logged(loop, host, token_config, caplog):
    with caplog.at_level(logging.DEBUG):
        with running_front_door(loop, host, token_config) as door:
            _compute(door.address, token=TOKEN)
            _fails(door.address, token=TOKEN + "-wrong", retries=False)
            _fails(door.address, token=SCOPED, retries=False)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "refused" in text  # the refusals were logged ...
    for secret in (TOKEN, SCOPED, hash_token(TOKEN)):
        assert secret not in text  # ... without the token


def test_token_sources(tmp_path):
    plain = tmp_path / "tokens.txt"
    plain.write_text(f"# one per line\n{TOKEN}\nsha256:{hash_token(SCOPED)}  # hashed\n")
    entries = load_token_file(plain)
    assert [e.sha256 for e in entries] == [hash_token(TOKEN), hash_token(SCOPED)]
    assert all(TOKEN not in repr(e) for e in entries)
    assert [e.sha256 for e in tokens_from_env({"MLIPSERVE_TOKENS": f"{TOKEN}, sha256:{'a' * 64}"})] == \
        [hash_token(TOKEN), "a" * 64]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokens:\n  - name: x\n    token: a\n    sha256: b\n")
    with pytest.raises(ValueError, match="exactly one of token or sha256"):
        load_token_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no tokens"):
        load_token_file(empty)


def test_config_objects_carry_only_digests():
    entry = TokenEntry(name="alice", sha256=hash_token(TOKEN))
    config = dataclasses.replace(ServerConfig(), tokens=(entry,))
    assert TOKEN not in repr(config) and config.authenticates
    assert np.all([c in "0123456789abcdef" for c in entry.sha256])

"""Every serve config in deploy/ (the local one, the Kubernetes base's and overlays' copies) is a
valid Serve config without Serve's gRPC proxy, whose application's args are a ServiceConfig that
builds; the local one serves on loopback, plaintext and without tokens, as `mlipserve serve` does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from mlipserve.app import build_app
from mlipserve.cli import load_service_config
from mlipserve.config import DEFAULT_GRPC_PORT, Limits, ServerConfig, ServiceConfig
from mlipserve.server.frontdoor import is_loopback
from mlipserve_client.types import Dispersion

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "serve_config.yaml"
# kustomize copies these, as text, into the RayService's serveConfigV2 (test_kubernetes.py checks
# the rendered ones too).
SERVE_CONFIGS = (CONFIG, *sorted((ROOT / "deploy" / "kubernetes").rglob("serve-config.yaml")))


def check_serve_config(config: dict, where: str) -> ServiceConfig:
    """The contract of every serve config in deploy/; returns its application's ServiceConfig."""
    # Clients reach the front door in each replica: Serve's gRPC proxy is gone, and with it the
    # servicer functions it had to import.
    assert "grpc_options" not in config, f"{where}: grpc_options configure Serve's gRPC proxy, which serves nothing"
    schema = ServeDeploySchema.model_validate(config)
    assert not schema.grpc_options.grpc_servicer_functions, where
    (app,) = schema.applications
    assert app.import_path == "mlipserve.app:build_app", where
    assert app.route_prefix is None, f"{where}: the application has no HTTP route (route_prefix: null)"
    args = config["applications"][0]["args"]
    assert "server" in args, f"{where}: the front door's settings (args.server) are missing"
    service = ServiceConfig.from_dict(args)
    assert isinstance(build_app(args), Application), where
    return service


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_every_serve_config_in_deploy_is_found():
    names = {str(p.relative_to(ROOT)) for p in SERVE_CONFIGS}
    assert {"deploy/serve_config.yaml", "deploy/kubernetes/base/serve-config.yaml",
            "deploy/kubernetes/overlays/gpu/serve-config.yaml",
            "deploy/kubernetes/overlays/tls-passthrough/serve-config.yaml"} <= names


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_serve_config_validates_and_its_args_are_a_service_config(path):
    check_serve_config(yaml.safe_load(path.read_text()), str(path.relative_to(ROOT)))


def test_local_config_serves_on_loopback_without_serve_proxies(serve_config):
    server = check_serve_config(serve_config, "deploy/serve_config.yaml").server
    # As `mlipserve serve` starts Serve: no proxies, nothing listening but the front doors.
    assert serve_config["proxy_location"] == "Disabled" and "http_options" not in serve_config
    assert is_loopback(server.host) and server.port == DEFAULT_GRPC_PORT
    # No certificate or token file by default (the secure variant is in the comments).
    assert not server.tls and not server.authenticates and server.health_port is None
    # The values it spells out are the defaults, as its comment says.
    assert server.limits == Limits() and server.drain_grace_s == ServerConfig().drain_grace_s


def test_application_builds_from_its_args(serve_config):
    args = serve_config["applications"][0]["args"]
    assert isinstance(build_app(args), Application)
    config = ServiceConfig.from_dict(args)
    assert [m.id for m in config.models] == ["chgnet-0.3.0"] and config.deployment("chgnet").num_cpus == 2


def test_cli_reads_a_serve_config(serve_config):
    config = load_service_config(CONFIG, ["chgnet-0.3.0"], num_cpus=1)
    assert config.deployment("chgnet").num_cpus == 1 and config.models[0].options == {"version": "0.3.0"}
    with pytest.raises(SystemExit, match="unknown model mace"):
        load_service_config(CONFIG, ["mace"], None)


def test_cli_picks_from_the_catalog_and_defaults_to_chgnet():
    assert [m.id for m in load_service_config(None, None, None).models] == ["chgnet-0.3.0"]
    config = load_service_config(None, ["sevennet-0", "chgnet-r2scan"], num_cpus=2)
    assert set(config.families) == {"sevennet", "chgnet"}
    assert config.deployment("sevennet").num_cpus == 2 and config.deployment("chgnet").num_cpus == 2
    catalog = ServiceConfig.catalog()
    assert {"chgnet-0.3.0", "mace-mp-0-small-random", "sevennet-0", "sevennet-l3i5"} <= {m.id for m in catalog.models}


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown keys num_cpu;"):
        ServiceConfig.from_dict({"models": [{"id": "x", "backend": "chgnet", "num_cpu": 2}]})
    with pytest.raises(ValueError, match="unique"):
        ServiceConfig.from_dict({"models": [{"id": "x", "backend": "chgnet"}] * 2})
    with pytest.raises(ValueError, match=r"deployments\[chgnet\]: unknown keys gpus"):
        ServiceConfig.from_dict({"models": [{"id": "x", "backend": "chgnet"}], "deployments": {"chgnet": {"gpus": 1}}})
    with pytest.raises(ValueError, match=r"batching: unknown keys wait_ms"):
        ServiceConfig.from_dict({"models": [{"id": "x", "backend": "chgnet", "batching": {"wait_ms": 1}}]})
    with pytest.raises(ValueError, match="without models: mace"):
        ServiceConfig.from_dict({"models": [{"id": "x", "backend": "chgnet"}], "deployments": {"mace": {}}})


def test_example_models_configs_parse():
    for path in (CONFIG.parent / "models").glob("*.yaml"):
        config = ServiceConfig.from_dict(yaml.safe_load(path.read_text()))
        assert config.models, path
    fairchem = ServiceConfig.from_dict(yaml.safe_load((CONFIG.parent / "models" / "fairchem.yaml").read_text()))
    assert fairchem.deployment("fairchem").runtime_env["pip"]["pip_check"] is False
    catalog = ServiceConfig.catalog()
    assert catalog.model("sevennet-mf-0").family_name == "sevennet-mf"
    assert "sevenn==0.13.0" in catalog.deployment("sevennet-mf").runtime_env["pip"]["packages"]
    composite = catalog.model("mace-mp-0-small-random+d3")
    assert composite.corrections == (Dispersion("pbe", "bj"),)
    assert composite.options == catalog.model("mace-mp-0-small-random").options

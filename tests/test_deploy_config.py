"""deploy/serve_config.yaml is a valid Serve config whose application builds, and it registers
exactly the servicers the embedded server registers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from mlipserve.app import GRPC_SERVICER_FUNCTIONS, build_app
from mlipserve.cli import load_service_config
from mlipserve.config import ServiceConfig
from mlipserve_client.types import Dispersion

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_validates_against_serve_schema(serve_config):
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "mlipserve.app:build_app" and app.route_prefix == "/"
    assert tuple(serve_config["grpc_options"]["grpc_servicer_functions"]) == GRPC_SERVICER_FUNCTIONS


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
    from mlipserve.config import ServiceConfig

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

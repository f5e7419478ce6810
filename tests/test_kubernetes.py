"""The Kubernetes deployment (deploy/kubernetes, deploy/docker, deploy/dashboards), checked offline.

- `kubectl kustomize` builds every overlay, without warnings.
- RayService objects validate against the v1 schema of KubeRay's CRDs (shared/fixtures/kuberay),
  strictly: a field the CRD does not know (which the API server would silently prune) is an error.
  Built-in kinds, and the Ray pod templates as Pods, validate against Kubernetes' own schemas
  (kubernetes-validate, strict) where it is installed, else against a minimal structural check.
- serveConfigV2 meets the contract of every serve config in deploy/ (test_deploy_config: a valid
  ServeDeploySchema without grpc_options whose args parse as a ServiceConfig and build the
  application), and its application is deploy/serve_config.yaml's: only device and resources, and
  the server block's host, ports, TLS and token file, may differ per overlay, so they cannot drift.
  Serve's HTTP proxy stays on every node for KubeRay.
- The front door (server block) listens on 0.0.0.0; the workers' container port and the port the
  gRPC Service targets are server.port, and their readiness probe is the standard gRPC health
  check on server.health_port. The gRPC Service, the PodDisruptionBudget and the TLS route reach
  exactly those workers. The token file (and, behind a TLS passthrough, the certificate and key)
  lies in a read-only mount of a Secret volume of the worker container, a Secret the README tells
  how to create.
- The Dockerfiles pin their bases and torch 2.13.0, install the client and the server (the fairchem
  image without mace-torch, sevenn and e3nn 0.4.4), and run as a non-root user.
- The Grafana dashboard queries only metrics that Ray Serve (read from the installed ray) and
  mlipserve (service/mlipserve/metrics.py) export, under the names Ray gives them; the monitoring
  component's PodMonitor scrapes every pod's Ray metrics port.

Nothing here needs a network, a cluster or a Docker daemon; only kubectl (skipped without it).
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("cpu", "gpu", "tls", "tls-passthrough")
# Where the front door itself speaks TLS (elsewhere TLS ends in front of it, or not at all).
TLS_AT_FRONT_DOOR = {"tls-passthrough"}
README = KUSTOMIZE / "README.md"
DOCKER = DEPLOY / "docker"
DOCKERFILES = ("cpu", "cuda", "fairchem")
DASHBOARD = DEPLOY / "dashboards" / "mlipserve-grafana.json"
NAMESPACE = "mlipserve"
# torch 2.13.0's PyPI wheel for Linux is the CUDA 13.0 build (it requires cuda-toolkit==13.0.3 and
# nvidia-cudnn-cu13): the CUDA base image must be a 13.0 one.
TORCH_CUDA = "13.0"
# What an overlay may change in the application's args relative to deploy/serve_config.yaml.
DEPLOYMENT_RESOURCE_KEYS = {"device", "num_cpus", "num_gpus", "num_replicas", "autoscaling"}
MODEL_RESOURCE_KEYS = {"device"}
SERVER_PLACEMENT_KEYS = {"host", "port", "health_port", "token_file", "tls_cert", "tls_key", "tls_client_ca"}
# Serve's HTTP proxy: no client traffic, but KubeRay health-checks it on the head's port "serve".
SERVE_HTTP_PORT = 8000
# Labels KubeRay puts on the pods it creates (and that templates cannot override).
KUBERAY_NODE_TYPE = "ray.io/node-type"
KUBERAY_GROUP = "ray.io/group"

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: cannot run `kubectl kustomize`")

try:
    import kubernetes_validate
except ImportError:  # not in the project's test extras: the structural check below stands in
    kubernetes_validate = None


def _fixtures() -> Path:
    candidates = [ROOT / "tests" / "fixtures", ROOT.parent / "shared" / "fixtures", Path("/work/shared/fixtures")]
    if "MLIPSERVE_FIXTURES" in os.environ:
        candidates.insert(0, Path(os.environ["MLIPSERVE_FIXTURES"]))
    return next((c for c in candidates if (c / "kuberay").is_dir()), candidates[0])


# --------------------------------------------------------------------------------------------
# Builds


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    """Each overlay as `kubectl kustomize` renders it: overlay -> objects."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot run `kubectl kustomize`")

    def build(overlay: str) -> tuple[str, subprocess.CompletedProcess]:
        path = KUSTOMIZE / "overlays" / overlay
        return overlay, subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(len(OVERLAYS)) as pool:
        done = dict(pool.map(build, OVERLAYS))
    out = {}
    for overlay, proc in done.items():
        assert proc.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{proc.stderr}"
        assert not proc.stderr.strip(), f"kubectl kustomize overlays/{overlay} warned:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _rayservice(objects: list[dict]) -> dict:
    return _one(objects, "RayService")


def _serve_config(objects: list[dict]) -> dict:
    text = _rayservice(objects)["spec"]["serveConfigV2"]
    assert isinstance(text, str) and text.strip(), "serveConfigV2 must be a non-empty YAML string"
    return yaml.safe_load(text)


def _server(objects: list[dict]):
    """The front door's settings (ServerConfig) of the build's application."""
    from mlipserve.config import ServiceConfig

    (app,) = _serve_config(objects)["applications"]
    return ServiceConfig.from_dict(app["args"]).server


def _groups(rayservice: dict) -> tuple[dict, list[dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster.get("workerGroupSpecs", [])


def _pod_labels(template: dict, node_type: str, group: str) -> dict[str, str]:
    """The labels KubeRay gives a pod of this group: the template's and its own."""
    labels = dict(template.get("metadata", {}).get("labels", {}))
    labels.update({KUBERAY_NODE_TYPE: node_type, KUBERAY_GROUP: group})
    return labels


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_the_expected_objects(builds, overlay):
    objects = builds[overlay]
    kinds = sorted(o["kind"] for o in objects)
    expected = ["Namespace", "PodDisruptionBudget", "RayService", "Service"]
    if overlay == "tls":
        expected += ["GRPCRoute", "Gateway"]
    # tls-passthrough: the same objects, the gRPC Service a LoadBalancer (no gateway in between).
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} outside {NAMESPACE}"
    # serve-config.yaml travels in a local-config ConfigMap that kustomize must drop.
    assert not any(o["kind"] == "ConfigMap" for o in objects)


# --------------------------------------------------------------------------------------------
# Schemas


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as `kubectl --validate=strict` does (the API server
    would prune them silently): objects with declared properties get additionalProperties false."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    """kind -> a validator of KubeRay's v1 openAPIV3Schema (RayService, RayCluster)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    folder = _fixtures() / "kuberay"

    def load(name: str) -> tuple[str, jsonschema.protocols.Validator]:
        with open(folder / name) as fh:
            crd = yaml.load(fh, Loader=loader)
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert v1["served"] and v1["storage"]
        schema = _strict(v1["schema"]["openAPIV3Schema"])
        return crd["spec"]["names"]["kind"], jsonschema.Draft7Validator(schema)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(load, ["ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"]))


def _errors(validator: jsonschema.protocols.Validator, obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_objects_validate_against_the_crds(builds, crd_validators, overlay):
    checked = 0
    for obj in builds[overlay]:
        if obj["kind"] not in crd_validators:
            continue
        assert obj["apiVersion"] == "ray.io/v1"
        assert not (errors := _errors(crd_validators[obj["kind"]], obj)), "\n".join(errors)
        checked += 1
        if obj["kind"] == "RayService":
            # The cluster part must also be a valid RayCluster (KubeRay creates one from it).
            cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "check"},
                       "spec": obj["spec"]["rayClusterConfig"]}
            assert not (errors := _errors(crd_validators["RayCluster"], cluster)), "\n".join(errors)
    assert checked == 1


def test_strict_crd_schema_rejects_unknown_and_mistyped_fields(crd_validators):
    """The validator above would catch a typo, not just pass everything."""
    good = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
            "spec": {"serveConfigV2": "applications: []", "rayClusterConfig": {"headGroupSpec": {
                "rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head", "image": "i:1"}]}}}}}}
    assert not _errors(crd_validators["RayService"], good)
    typo = copy.deepcopy(good)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert any("readinesProbe" in e for e in _errors(crd_validators["RayService"], typo))
    mistyped = copy.deepcopy(good)
    mistyped["spec"]["serveConfigV2"] = {"applications": []}
    assert _errors(crd_validators["RayService"], mistyped)


_GATEWAY_API = "gateway.networking.k8s.io/"


def _builtin_objects(objects: list[dict]) -> list[dict]:
    """Objects of built-in kinds, plus the Ray pod templates as the Pods KubeRay makes of them."""
    out = [o for o in objects if not o["apiVersion"].startswith(("ray.io/", _GATEWAY_API))]
    head, workers = _groups(_rayservice(objects))
    for name, group in [("head", head)] + [(w["groupName"], w) for w in workers]:
        template = group["template"]
        metadata = {"name": f"mlipserve-{name}", **template.get("metadata", {})}
        out.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    return out


def _structural_errors(obj: dict) -> list[str]:
    """Stand-in for kubernetes-validate: the fields these kinds cannot do without."""
    errors = [f"missing {f}" for f in ("apiVersion", "kind", "metadata") if f not in obj]
    if not obj.get("metadata", {}).get("name"):
        errors.append("metadata.name missing")
    spec = obj.get("spec", {})
    if obj["kind"] == "Service":
        for port in spec.get("ports", []):
            if not isinstance(port.get("port"), int) or not 0 < port["port"] < 65536:
                errors.append(f"bad port {port}")
        if not spec.get("selector"):
            errors.append("Service without selector")
    elif obj["kind"] == "PodDisruptionBudget":
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            errors.append("PDB needs exactly one of minAvailable, maxUnavailable")
        if not spec.get("selector", {}).get("matchLabels"):
            errors.append("PDB without selector")
    elif obj["kind"] == "Pod":
        for c in spec.get("containers", []):
            if not c.get("name") or not c.get("image"):
                errors.append(f"container without name or image: {c.get('name')}")
            for port in c.get("ports", []):
                if not isinstance(port.get("containerPort"), int) or len(port.get("name", "")) > 15:
                    errors.append(f"bad container port {port}")
    return errors


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_against_kubernetes_schemas(builds, overlay):
    """kubernetes-validate (strict, newest bundled Kubernetes) where installed; else a structural check."""
    objects = _builtin_objects(builds[overlay])
    assert {o["kind"] for o in objects} == {"Namespace", "Service", "PodDisruptionBudget", "Pod"}
    problems = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if kubernetes_validate is None:
            problems += [f"{where}: {e}" for e in _structural_errors(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{where}: {'/'.join(map(str, err.absolute_path))}: {err.message[:300]}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# serveConfigV2 against deploy/serve_config.yaml


@pytest.fixture(scope="module")
def reference_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


def _comparable(args: dict) -> dict:
    """args without what an overlay may change: resources, and where the front door listens and
    finds its tokens and certificate."""
    args = copy.deepcopy(args)
    for key in SERVER_PLACEMENT_KEYS:
        args.get("server", {}).pop(key, None)
    for deployment in (args.get("deployments") or {}).values():
        for key in DEPLOYMENT_RESOURCE_KEYS:
            deployment.pop(key, None)
    for model in args.get("models") or []:
        for key in MODEL_RESOURCE_KEYS:
            model.pop(key, None)
    return args


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_deploy_serve_config(builds, reference_config, overlay):
    from test_deploy_config import check_serve_config

    from mlipserve.config import ServiceConfig

    config = _serve_config(builds[overlay])
    check_serve_config(config, f"overlays/{overlay}: serveConfigV2")
    # Locally Serve runs without proxies; on KubeRay its HTTP proxy stays on every node, because
    # KubeRay health-checks it (pod labels of its serve Service, the RayService's readiness).
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"] == {"host": "0.0.0.0", "port": SERVE_HTTP_PORT}

    # Everything else but the applications (logging) is the same.
    local_only = {"applications", "proxy_location", "http_options"}
    assert {k: v for k, v in config.items() if k not in local_only} == \
        {k: v for k, v in reference_config.items() if k not in local_only}

    apps, reference_apps = config["applications"], reference_config["applications"]
    assert [a["name"] for a in apps] == [a["name"] for a in reference_apps]
    for app, reference in zip(apps, reference_apps):
        assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in reference.items() if k != "args"}
        assert [m["id"] for m in app["args"]["models"]] == [m["id"] for m in reference["args"]["models"]]
        assert _comparable(app["args"]) == _comparable(reference["args"]), \
            "only resources and the front door's address, TLS and tokens may differ from deploy/serve_config.yaml"
        service = ServiceConfig.from_dict(app["args"])
        for family in service.families:
            deployment = service.deployment(family)
            devices = {m.device or deployment.device for m in service.families[family]}
            if overlay == "gpu":
                assert devices == {"cuda"} and deployment.num_gpus >= 1, family
            else:
                assert devices == {"cpu"} and deployment.num_gpus == 0, family


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_fit_the_workers_and_images_match_the_overlay(builds, overlay):
    from mlipserve.config import ServiceConfig

    objects = builds[overlay]
    rayservice = _rayservice(objects)
    import ray

    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    head, workers = _groups(rayservice)
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not take model replicas"
    limits = [w["template"]["spec"]["containers"][0]["resources"]["limits"] for w in workers]

    def quantity(value: Any) -> float:
        text = str(value)
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)

    for app in _serve_config(objects)["applications"]:
        service = ServiceConfig.from_dict(app["args"])
        for family in service.families:
            d = service.deployment(family)
            assert any(quantity(lim.get("cpu", 0)) >= d.num_cpus
                       and quantity(lim.get("nvidia.com/gpu", 0)) >= d.num_gpus for lim in limits), \
                f"no worker group fits a {family} replica ({d.num_cpus} CPU, {d.num_gpus} GPU)"

    containers = [head["template"]["spec"]["containers"][0]] + [w["template"]["spec"]["containers"][0] for w in workers]
    for c in containers:
        image, _, tag = c["image"].rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, f"image without a pinned tag: {c['image']}"
        assert ("cuda" if overlay == "gpu" else "cpu") in image
    if overlay == "gpu":
        assert all(quantity(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)
        assert all(any(t.get("key") == "nvidia.com/gpu" for t in w["template"]["spec"].get("tolerations", []))
                   for w in workers)
    else:
        assert "nvidia.com/gpu" not in json.dumps(rayservice)


# --------------------------------------------------------------------------------------------
# Readiness and the gRPC path


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_ready_when_the_grpc_health_check_serves(builds, overlay):
    objects = builds[overlay]
    server = _server(objects)
    # The front door in a pod: every interface, and a plaintext health port apart from the API's.
    assert server.host == "0.0.0.0"
    assert server.health_port is not None and server.health_port != server.port
    head, workers = _groups(_rayservice(objects))
    assert workers

    head_container = head["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    # KubeRay builds its serve service from the head's port named "serve" (Serve's HTTP proxy).
    assert head_ports["serve"] == _serve_config(objects)["http_options"]["port"]
    # The head runs no replica, hence no front door.
    assert not {server.port, server.health_port} & set(head_ports.values())
    # KubeRay deploys the application only once the head is ready: the head must keep KubeRay's
    # probes, not wait for the application.
    assert "readinessProbe" not in head_container
    assert _rayservice(objects)["spec"].get("excludeHeadPodFromServeSvc") is True

    for worker in workers:
        container = worker["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == server.port and ports["grpc-health"] == server.health_port
        probe = container["readinessProbe"]
        assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}
        # grpc.health.v1.Health/Check for the whole service (no service name, or the API's), on the
        # plaintext port: the kubelet's gRPC probe cannot do TLS.
        assert probe["grpc"]["port"] == server.health_port
        assert probe["grpc"].get("service", "") in ("", "mlipserve.v1.MLIPService")
        assert probe.get("timeoutSeconds", 1) >= 3, "a replica answers on its event loop, busy under load"

    service = _one(objects, "Service", "mlipserve-grpc")
    (port,) = service["spec"]["ports"]  # the API port only: the health port is the kubelet's
    # h2c where the front door speaks plaintext; that never leaves the cluster.
    assert port.get("appProtocol") == (None if server.tls else "kubernetes.io/h2c")
    assert service["spec"].get("type", "ClusterIP") == ("LoadBalancer" if overlay in TLS_AT_FRONT_DOOR else "ClusterIP")
    worker_labels = [_pod_labels(w["template"], "worker", w["groupName"]) for w in workers]
    head_labels = _pod_labels(head["template"], "head", "headgroup")
    pdb = _one(objects, "PodDisruptionBudget")
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert all(_matches(selector, labels) for labels in worker_labels), "must select every worker"
        assert not _matches(selector, head_labels), "must not select the head (not gated by the probe)"
        # app.kubernetes.io/name stays KubeRay's ("kuberay"): its head service selects on it.
        assert "app.kubernetes.io/name" not in selector
    for w in workers:
        assert "app.kubernetes.io/name" not in w["template"].get("metadata", {}).get("labels", {})
        named = {p["name"]: p["containerPort"] for p in w["template"]["spec"]["containers"][0]["ports"]}
        target = port["targetPort"]
        assert (named.get(target) if isinstance(target, str) else target) == server.port


def _secret_item(pod_spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret, key) of the file ``path`` in this container: it must lie in a read-only mount of a
    Secret volume that is not optional (without the Secret the pod does not start, rather than
    serve without tokens or TLS), and be one of the volume's items where it lists them."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        try:
            relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
        except ValueError:
            continue
        assert "subPath" not in mount, f"{path}: a subPath mount never sees a renewed Secret"
        secret = volumes[mount["name"]].get("secret")
        assert secret, f"{path} lies in volume {mount['name']}, which is not a Secret"
        assert mount.get("readOnly") is True, f"{path}: mount {mount['mountPath']} read-only"
        assert not secret.get("optional", False), f"{path}: Secret {secret['secretName']} must not be optional"
        if "items" not in secret:
            return secret["secretName"], relative
        keys = {item["path"]: item["key"] for item in secret["items"]}
        assert relative in keys, f"{path}: no item of Secret {secret['secretName']} is mounted as {relative}"
        return secret["secretName"], keys[relative]
    raise AssertionError(f"{path} lies in no volume mounted in container {container['name']}")


def test_secret_item_check_rejects_files_outside_secret_mounts():
    spec = {"volumes": [{"name": "tokens", "secret": {"secretName": "t", "items": [{"key": "k", "path": "a.yaml"}]}},
                        {"name": "scratch", "emptyDir": {}}]}
    container = {"name": "c", "volumeMounts": [{"name": "tokens", "mountPath": "/etc/t", "readOnly": True},
                                               {"name": "scratch", "mountPath": "/tmp/s"}]}
    assert _secret_item(spec, container, "/etc/t/a.yaml") == ("t", "k")
    for path, message in [("/etc/tokens.yaml", "no volume"), ("/etc/t/b.yaml", "no item"), ("/tmp/s/a", "not a Secret")]:
        with pytest.raises(AssertionError, match=message):
            _secret_item(spec, container, path)
    container["volumeMounts"][0]["readOnly"] = False
    with pytest.raises(AssertionError, match="read-only"):
        _secret_item(spec, container, "/etc/t/a.yaml")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_front_door_reads_tokens_and_certificate_from_mounted_secrets(builds, overlay):
    objects = builds[overlay]
    server = _server(objects)
    readme = README.read_text()
    # Tokens everywhere (also behind a TLS-terminating gateway); TLS in the front door where the
    # overlay passes TLS through to it.
    assert server.token_file and server.authenticates
    assert server.tls == (overlay in TLS_AT_FRONT_DOOR) and server.tls_client_ca is None
    head, workers = _groups(_rayservice(objects))
    secrets = set()
    for worker in workers:
        spec = worker["template"]["spec"]
        container = spec["containers"][0]
        secret, key = _secret_item(spec, container, server.token_file)
        assert re.search(rf"create secret generic {re.escape(secret)} --from-file={re.escape(key)}\b", readme), \
            f"README.md must tell how to create Secret {secret} with key {key}"
        secrets.add(secret)
        if server.tls:
            items = {_secret_item(spec, container, path) for path in (server.tls_cert, server.tls_key)}
            ((tls_secret, _), _) = items
            # Secret type kubernetes.io/tls: its keys are tls.crt and tls.key.
            assert items == {(tls_secret, "tls.crt"), (tls_secret, "tls.key")}
            assert f"create secret tls {tls_secret}" in readme
            secrets.add(tls_secret)
    # The head runs no front door: it has no business holding the tokens or the key.
    head_spec = head["template"]["spec"]
    assert not {v["secret"]["secretName"] for v in head_spec.get("volumes", []) if "secret" in v} & secrets


@needs_kubectl
def test_tls_overlay_terminates_tls_in_front_of_the_grpc_service(builds):
    objects = builds["tls"]
    gateway, route = _one(objects, "Gateway"), _one(objects, "GRPCRoute")
    assert gateway["apiVersion"] == route["apiVersion"] == "gateway.networking.k8s.io/v1"
    annotations = gateway["metadata"].get("annotations", {})
    assert {"cert-manager.io/cluster-issuer", "cert-manager.io/issuer"} & set(annotations)
    listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
    assert gateway["spec"]["gatewayClassName"]

    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"]
    listener = listeners[parent["sectionName"]]
    assert listener["protocol"] == "HTTPS" and listener["port"] == 443
    assert listener["tls"]["mode"] == "Terminate" and listener["tls"]["certificateRefs"]
    assert route["spec"]["hostnames"] == [listener["hostname"]]
    assert any(k.get("kind") == "GRPCRoute" for k in listener["allowedRoutes"]["kinds"])

    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    served = set()
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert ref["name"] in services, f"GRPCRoute backend {ref['name']} is not in the build"
            assert ref["port"] in [p["port"] for p in services[ref["name"]]["spec"]["ports"]]
        served |= {m["method"]["service"] for m in rule.get("matches", [])}
    # What the front door serves on its port: the API, health and reflection (v1 and v1alpha).
    assert served == {"mlipserve.v1.MLIPService", "grpc.health.v1.Health",
                      "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


# --------------------------------------------------------------------------------------------
# Metrics: the monitoring component's PodMonitor scrapes every pod's Ray metrics endpoint


MONITORING = KUSTOMIZE / "components" / "monitoring"
# What KubeRay passes as --metrics-export-port where rayStartParams sets none.
KUBERAY_METRICS_PORT = "8080"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_component_scrapes_every_pods_ray_metrics_port(builds, overlay, tmp_path):
    """The overlay plus components/monitoring: the same objects and a PodMonitor that selects the
    head and every worker on the container port named after its metrics-export-port."""
    relative = Path(os.path.relpath(KUSTOMIZE, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(relative / "overlays" / overlay)], "components": [str(relative / "components" / "monitoring")]}))
    proc = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    monitor = _one(objects, "PodMonitor")
    assert [o for o in objects if o is not monitor] == builds[overlay], "the component adds the PodMonitor only"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    selector = spec["selector"]["matchLabels"]
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics" and endpoint.get("scheme", "http") == "http"

    head, workers = _groups(_rayservice(objects))
    for group, labels in [(head, _pod_labels(head["template"], "head", "headgroup"))] + \
            [(w, _pod_labels(w["template"], "worker", w["groupName"])) for w in workers]:
        assert _matches(selector, labels), f"the PodMonitor misses pods labelled {labels}"
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        exported = int(group["rayStartParams"].get("metrics-export-port", KUBERAY_METRICS_PORT))
        assert ports.get(endpoint["port"]) == exported, \
            f"container port {endpoint['port']!r} must be Ray's metrics-export-port {exported}"
    assert "components/monitoring" in README.read_text()


# --------------------------------------------------------------------------------------------
# Dockerfiles


@cache
def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / f"Dockerfile.{name}").read_text()
    instructions, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def _dockerignore_allows(name: str, path: str) -> bool:
    """Docker's rule: the last matching pattern decides; "!" re-includes."""
    allowed = True
    for pattern in (DOCKER / f"Dockerfile.{name}.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_torch_and_installs_client_and_server(name):
    instructions = _dockerfile(name)
    runs = "\n".join(args for keyword, args in instructions if keyword == "RUN")
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    image, _, tag = base.split()[0].rpartition(":")
    assert image and tag and tag != "latest", f"FROM must name a pinned tag: {base}"

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires and ("python3.11" in runs or base.startswith("python:3.11")), \
        "the image's Python must be the project's (3.11)"
    if name == "cpu":
        assert base.startswith(("python:3.11-slim", "rayproject/ray:2.60.0-py311-cpu"))
        assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    else:
        assert image == "nvidia/cuda" and tag.startswith(TORCH_CUDA + "."), \
            f"the CUDA base must match torch 2.13's CUDA {TORCH_CUDA}: {base}"
        assert "download.pytorch.org/whl/cpu" not in runs
    assert re.search(r"pip install [^\n;&]*torch==2\.13\.0", runs)

    installs = [shlex.split(line) for line in re.findall(r"pip install [^;&\n]+", runs)]
    paths = [arg for cmd in installs for arg in cmd if arg.startswith(("/", "."))]
    assert any(p.rstrip("/").endswith("/client") for p in paths), "must install ./client"
    assert any(p.rstrip("/").endswith("/mlipserve") or p == "." for p in paths), "must install the server"
    # The front door serves the generated stubs: the build checks they import.
    assert "mlipserve_client.v1.service_pb2_grpc" in runs and "grpc_health.v1.health_pb2_grpc" in runs

    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert _dockerignore_allows(name, source), f"COPY {source}: excluded by the .dockerignore"
    for unwanted in (".git", "tests", "benchmarks", "client/build", "service/mlipserve.egg-info"):
        assert not _dockerignore_allows(name, unwanted), f"{unwanted} should stay out of the context"

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert not any(k == "RUN" for k, _ in instructions[last_user:]), "nothing may run as root after USER"
    exposed = {int(p.split("/")[0]) for k, args in instructions if k == "EXPOSE" for p in args.split()}
    # The front door's API and health ports, Serve's HTTP proxy (KubeRay), the dashboard.
    assert {50051, 50052, 8000, 8265} <= exposed


def test_fairchem_image_leaves_out_mace_sevenn_and_old_e3nn():
    runs = "\n".join(args for keyword, args in _dockerfile("fairchem") if keyword == "RUN")
    assert re.search(r"fairchem-core==\d+\.\d+\.\d+", runs)
    assert "--no-deps /tmp/mlipserve" in runs, "mlipserve itself must come without its dependencies"
    assert not re.search(r"pip install [^\n;&]*(mace-torch|sevenn|e3nn==)", runs)
    match = re.search(r"requirements\.py\s+(\S+)\s+--exclude\s+([^>]+)>", runs)
    assert match, "the dependency list must come from requirements.py"
    excluded = match.group(2).split()
    assert {"mace-torch", "sevenn", "e3nn", "mlipserve-client"} <= set(excluded)

    spec = importlib.util.spec_from_file_location("deploy_requirements", DOCKER / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    requirements = module.requirements(str(ROOT / "pyproject.toml"), excluded)
    names = {module._name(r) for r in requirements}
    assert not names & {"mace-torch", "sevenn", "e3nn", "mlipserve-client"}
    assert {"torch==2.13.0", "ray[serve]==2.60.0"} <= set(requirements)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    all_names = {module._name(d) for d in dependencies}
    assert names == all_names - set(excluded)
    with pytest.raises(SystemExit, match="no dependency"):
        module.requirements(str(ROOT / "pyproject.toml"), ["not-a-dependency"])


# --------------------------------------------------------------------------------------------
# Grafana dashboard


_RAY_PREFIX = "ray_"


@pytest.fixture(scope="module")
def exported_metrics() -> dict[str, tuple[str, re.Pattern, frozenset[str] | None]]:
    """name -> (type, pattern of the name as recorded, its labels or None when not known).

    Ray Serve's are read from the installed ray (every Counter/Gauge/Histogram it creates under
    ray/serve); mlipserve's from its BatchMetrics and RequestMetrics, plus the tags Serve adds to
    metrics recorded in replicas (deployment, replica, application).
    """
    import ray.serve
    import ray.serve.metrics as serve_metrics
    from ray.util.metrics import Metric

    from mlipserve.metrics import BatchMetrics, RequestMetrics

    out: dict[str, tuple[str, re.Pattern, frozenset[str] | None]] = {}
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if kind not in ("Counter", "Gauge", "Histogram"):
                continue
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out[arg.value] = (kind, re.compile(re.escape(arg.value)), None)
            elif isinstance(arg, ast.JoinedStr):  # f"serve_num_{protocol_name}_requests"
                regex = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else "[a-z0-9]+" for v in arg.values)
                out[ast.unparse(arg)] = (kind, re.compile(regex), None)
    assert len(out) > 40 and "serve_deployment_queued_queries" in out, "Ray Serve's metrics were not found"

    serve_tags = {serve_metrics.DEPLOYMENT_TAG, serve_metrics.REPLICA_TAG, serve_metrics.APPLICATION_TAG}
    public = [(k, m) for k, m in (*vars(BatchMetrics()).items(), *vars(RequestMetrics()).items()) if k[0] != "_"]
    assert all(isinstance(m, Metric) for _, m in public), "the public attributes of the metrics classes are metrics"
    ours = [m for _, m in public]
    for metric in ours:
        kind = next(c.__name__ for c in type(metric).__mro__ if c.__name__ in ("Counter", "Gauge", "Histogram"))
        info = metric.info
        out[info["name"]] = (kind, re.compile(re.escape(info["name"])), frozenset(info["tag_keys"]) | serve_tags)
    return out


def _resolve(series: str, exported: dict) -> tuple[str, frozenset[str] | None] | None:
    """The exported metric a Prometheus series name belongs to: Ray prefixes "ray_"; counters end
    in _total; histograms export _bucket, _sum and _count; gauges keep their name."""
    if not series.startswith(_RAY_PREFIX):
        return None
    name = series[len(_RAY_PREFIX):]
    readings = [(name, "Gauge"), (name, "Counter")] if name.endswith("_total") else [(name, "Gauge")]
    if name.endswith("_total"):
        readings.append((name[: -len("_total")], "Counter"))
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            readings.append((name[: -len(suffix)], "Histogram"))
    for base, kind in readings:
        for metric_kind, pattern, labels in exported.values():
            if metric_kind == kind and pattern.fullmatch(base):
                return base, labels
    return None


def _dashboard_queries(dashboard: dict) -> list[str]:
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_queries_only_exported_metrics(exported_metrics):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables

    queries = _dashboard_queries(dashboard)
    assert len(queries) > 10
    used: set[str] = set()
    problems = []
    for query in queries:
        for variable in re.findall(r"\$(\w+)", query):
            if not variable.startswith("__"):
                assert variable in variables, f"{query}: ${variable} is not a dashboard variable"
        # Every metric name: ray_* identifiers, and nothing that looks like an unprefixed one.
        names = set(re.findall(r"\bray_[a-z0-9_]+", query))
        for bare in re.findall(r"(?<![A-Za-z0-9_])((?:serve|mlipserve)_[a-z0-9_]+)", query):
            problems.append(f"{query}: {bare} is missing Ray's prefix {_RAY_PREFIX}")
        labels_allowed: set[str] | None = {"le"}
        for name in names:
            resolved = _resolve(name, exported_metrics)
            if resolved is None:
                problems.append(f"{query}: {name} is not a metric Ray Serve or mlipserve exports "
                                "(or not under that suffix)")
                labels_allowed = None
                continue
            base, labels = resolved
            used.add(base)
            labels_allowed = None if labels is None or labels_allowed is None else labels_allowed | labels
        if labels_allowed is None or not names:
            continue
        # mlipserve-only queries: grouping and matching only on labels those metrics carry.
        grouped = {g.strip() for clause in re.findall(r"\bby\s*\(([^)]*)\)", query) for g in clause.split(",")}
        matched = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", query))
        unknown = (grouped | matched) - labels_allowed - {""}
        if unknown:
            problems.append(f"{query}: labels {sorted(unknown)} are not tags of these metrics")
    assert not problems, "\n".join(problems)
    # The dashboard covers the front doors' requests and the batching; nothing of Serve's gRPC proxy,
    # which carries no traffic.
    assert {"mlipserve_requests", "mlipserve_request_seconds", "mlipserve_queue_wait_seconds",
            "mlipserve_model_seconds", "mlipserve_corrections_seconds", "mlipserve_serialization_seconds",
            "mlipserve_requests_in_flight", "mlipserve_sessions_open", "mlipserve_session_steps",
            "mlipserve_request_bytes", "mlipserve_response_bytes", "mlipserve_auth_failures"} <= used
    assert not {name for name in used if "grpc" in name}
    assert {"mlipserve_batches", "mlipserve_batch_atoms", "mlipserve_batch_requests", "mlipserve_batch_seconds",
            "mlipserve_batch_budget", "mlipserve_device_capacity", "mlipserve_queued_work"} <= used


def test_metric_name_resolution_rejects_wrong_names_and_suffixes(exported_metrics):
    assert _resolve("ray_serve_num_grpc_requests_total", exported_metrics)
    assert _resolve("ray_mlipserve_batches_total", exported_metrics)
    assert _resolve("ray_mlipserve_batch_seconds_bucket", exported_metrics)
    assert _resolve("ray_mlipserve_queued_work", exported_metrics)
    assert _resolve("ray_mlipserve_requests_total", exported_metrics)
    assert _resolve("ray_mlipserve_request_seconds_bucket", exported_metrics)
    assert _resolve("ray_mlipserve_sessions_open", exported_metrics)
    assert _resolve("ray_mlipserve_requests", exported_metrics) is None  # a counter without _total
    assert _resolve("ray_serve_health_check_failures_total", exported_metrics)
    assert _resolve("ray_mlipserve_batches", exported_metrics) is None  # a counter without _total
    assert _resolve("ray_mlipserve_queued_work_total", exported_metrics) is None  # a gauge with _total
    assert _resolve("ray_mlipserve_batch_atom_bucket", exported_metrics) is None  # a typo
    assert _resolve("mlipserve_batches_total", exported_metrics) is None  # no ray_ prefix
    assert _resolve("ray_serve_num_ongoing_requests", exported_metrics) is None  # not a Serve metric

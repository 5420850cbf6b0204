"""deploy/k8s validated offline.

* Core kinds (Deployment, Service, HPA, PDB, ConfigMap, PVC): ``kubernetes-validate`` in strict mode (unknown
  fields refused) against Kubernetes 1.37's schemas.
* KubeRay kinds (RayService, RayJob, ``ray.io/v1``): a JSON schema written here from the CRDs' required fields,
  types and property names (kuberay's ``ray-operator/config/crd/bases``), stricter than the CRDs themselves on
  the levels it lists (unknown fields refused); the pod templates inside them are validated as core
  ``PodTemplate`` objects, strictly.
* What the manifests mean for this project: probes on routes the app has, ``DETECT_*`` values that
  :class:`api.settings.Settings` accepts, the RayService's ``import_path`` and ``args``, and the RayJob's
  entrypoint parsed by ``detect``'s own argument parser.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "PersistentVolumeClaim"}


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        found += [(str(path.relative_to(K8S)), doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def closed(properties: dict, required: list[str] = ()) -> dict:
    """An object schema that refuses fields other than ``properties``."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


OBJECT = {"type": "object"}
INT = {"type": "integer"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
HEAD_GROUP = closed(
    {"rayStartParams": STRING_MAP, "template": OBJECT, "serviceType": {"type": "string"}, "headService": OBJECT,
     "enableIngress": {"type": "boolean"}, "labels": STRING_MAP, "resources": STRING_MAP},
    ["template"],
)
WORKER_GROUP = closed(
    {"groupName": {"type": "string"}, "replicas": INT, "minReplicas": INT, "maxReplicas": INT, "rayStartParams": STRING_MAP,
     "template": OBJECT, "idleTimeoutSeconds": INT, "numOfHosts": INT, "suspend": {"type": "boolean"},
     "labels": STRING_MAP, "resources": STRING_MAP, "scaleStrategy": OBJECT},
    ["groupName", "minReplicas", "maxReplicas", "template"],
)
RAY_CLUSTER = closed(
    {"rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"}, "autoscalerOptions": OBJECT,
     "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}},
    ["headGroupSpec"],
)
METADATA = {"type": "object", "required": ["name"]}
KUBERAY_SCHEMAS = {
    "RayService": closed(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": METADATA,
         "spec": closed({"serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER,
                         "serviceUnhealthySecondThreshold": INT, "deploymentUnhealthySecondThreshold": INT},
                        ["rayClusterConfig"])},
        ["apiVersion", "kind", "metadata", "spec"],
    ),
    "RayJob": closed(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": METADATA,
         "spec": closed({"entrypoint": {"type": "string"}, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                         "backoffLimit": INT, "activeDeadlineSeconds": INT, "shutdownAfterJobFinishes": {"type": "boolean"},
                         "ttlSecondsAfterFinished": INT, "runtimeEnvYAML": {"type": "string"}, "rayClusterSpec": RAY_CLUSTER},
                        ["entrypoint", "rayClusterSpec"])},
        ["apiVersion", "kind", "metadata", "spec"],
    ),
}


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def test_every_manifest_is_known_and_core_kinds_validate() -> None:
    kinds = set()
    for name, doc in documents():
        kinds.add(doc["kind"])
        if doc["kind"] == "Kustomization":
            assert all((K8S / Path(name).parent / r).is_file() for r in doc["resources"])
        elif doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        else:
            jsonschema.validate(doc, KUBERAY_SCHEMAS[doc["kind"]])
    assert kinds == CORE_KINDS | {"Kustomization", "RayService", "RayJob"}
    assert len(by_kind("Deployment")) == 2  # CPU and GPU


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_kuberay_pod_templates_are_valid_core_pod_templates(kind: str) -> None:
    checked = 0
    for doc in by_kind(kind):
        for i, template in enumerate(pod_templates(doc)):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)  # raises on any invalid field
            checked += 1
    assert checked >= 2  # a head group and a worker group at least


def named(kind: str, name: str) -> dict:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def test_the_kuberay_schema_refuses_a_typo() -> None:
    """The hand-written schema is not vacuous: a misspelt field and a missing required one are refused."""
    job = named("RayJob", "detect-batch")
    typo = {**job, "spec": {**job["spec"], "entrypont": "x"}}
    missing = {**job, "spec": {k: v for k, v in job["spec"].items() if k != "rayClusterSpec"}}
    for bad in (typo, missing):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, KUBERAY_SCHEMAS["RayJob"])


def test_pods_are_non_root_with_read_only_root_and_a_writable_tmp() -> None:
    for doc in by_kind("Deployment") + by_kind("RayService") + by_kind("RayJob"):
        for template in pod_templates(doc):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            volumes = {v["name"]: v for v in spec["volumes"]}
            for container in spec["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]]
                assert container["resources"]["requests"] and container["resources"]["limits"]


def test_deployments_probe_the_apps_routes_and_the_gpu_variant_asks_for_a_gpu() -> None:
    from api.app import create_app

    routes = {route.path for route in create_app().routes}
    for deployment in by_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"/healthz", "/readyz"} <= routes
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (service,) = by_kind("Service")
        assert service["spec"]["selector"].items() <= labels.items()
    gpu = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "detect-gpu")
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "DETECT_DEVICE", "value": "cuda"} in container["env"]


def test_configmap_settings_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.settings import Settings

    (config,) = by_kind("ConfigMap")
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    detect_keys = {k.removeprefix("DETECT_").lower() for k in config["data"] if k.startswith("DETECT_")}
    assert detect_keys <= set(Settings.model_fields)
    assert (settings.max_batch, settings.torch_threads, settings.device) == (8, 2, "cpu")


def test_rayservice_imports_our_builder_with_valid_args() -> None:
    pytest.importorskip("ray")
    from api.ray_serve import Scaling

    (service,) = by_kind("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    scaling = Scaling.parse(app["args"].get("replicas"), app["args"].get("autoscale"))
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 8)


def test_rayjob_entrypoint_is_a_valid_detect_command() -> None:
    from detect.cli import build_parser

    job = named("RayJob", "detect-batch")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "detect"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.engine, args.resume, args.actors) == ("predict", "ray", True, 4)
    mounts = {m["mountPath"] for m in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert any(args.out.startswith(m + "/") for m in mounts)  # the driver writes onto a volume


def test_training_rayjob_runs_ray_train_on_gpu_workers_sharing_the_run_folder() -> None:
    """``detect train --engine ray``: a recipe of the repository, as many Ray Train workers as GPU pods, one GPU
    each, and the run folder on the ReadWriteMany volume every pod mounts (rank 0 writes, all ranks resume)."""
    from detect.cli import build_parser
    from detect.training import load_recipe

    job = named("RayJob", "detect-train")
    argv = shlex.split(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.engine, args.gpus_per_worker) == ("train", "ray", 1)
    load_recipe(Path(__file__).resolve().parents[2] / args.recipe)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == args.workers
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    for spec in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert any(args.out.startswith(path + "/") and claims.get(name) == "detect-train" for path, name in mounts.items())
    (claim,) = [d for d in by_kind("PersistentVolumeClaim") if d["metadata"]["name"] == "detect-train"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

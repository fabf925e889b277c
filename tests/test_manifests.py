"""Cluster manifests: the `ray up` config against the schema inside the ray package; the KubeRay
ones for the fields KubeRay v1 requires; RayService's serveConfigV2 is a valid Serve config."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

MANIFESTS = Path(__file__).resolve().parent.parent / "cluster" / "manifests"


def _load(name):
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_cluster_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _load("ray-cluster.aws.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert {"cpu_worker", "gpu_worker"} <= set(cfg["available_node_types"])
    assert "2.60.0" in cfg["docker"]["image"]


def _check_pod_template(t, where):
    containers = t["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers), where


def _check_cluster_spec(spec, where):
    assert spec["rayVersion"] == "2.60.0", where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, where
    _check_pod_template(head["template"], where)
    for g in spec.get("workerGroupSpecs", []):
        assert g["groupName"] and "rayStartParams" in g and g["minReplicas"] <= g["maxReplicas"], where
        _check_pod_template(g["template"], where)


def test_kuberay_manifests_have_the_required_fields():
    rc = _load("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(rc["spec"], "RayCluster")
    job = _load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m negatron.cluster.cli")
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    svc = _load("rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    _check_cluster_spec(svc["spec"]["rayClusterConfig"], "RayService")


def test_rayservice_serve_config_is_what_serve_build_writes():
    from ray.serve.schema import ServeDeploySchema

    from negatron.cluster.serve_config import ServeSection

    sc = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(sc).applications[0]
    assert app.import_path == "negatron.serve.app:app_builder"
    section = ServeSection.model_validate(app.args)
    assert section.host == "0.0.0.0" and section.encoder.scale.max_replicas == 4

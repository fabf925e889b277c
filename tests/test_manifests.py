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


def _cluster_specs():
    """(where, RayClusterSpec) of every KubeRay manifest."""
    yield "raycluster.yaml", _load("raycluster.yaml")["spec"]
    yield "rayjob.yaml", _load("rayjob.yaml")["spec"]["rayClusterSpec"]
    yield "rayservice.yaml", _load("rayservice.yaml")["spec"]["rayClusterConfig"]


def _containers(spec):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in spec.get("workerGroupSpecs", []):
        yield from g["template"]["spec"]["containers"]


def test_no_manifest_exposes_the_dashboard_without_token_auth():
    for where, spec in _cluster_specs():
        host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
        token = (spec.get("authOptions") or {}).get("mode") == "token" or all(
            any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env", []))
            for c in _containers(spec))
        assert host in ("127.0.0.1", "localhost") or token, f"{where}: dashboard on {host} without token auth"
    cfg = _load("ray-cluster.aws.yaml")
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
            assert "--dashboard-host=0.0.0.0" not in cmd, cmd
    assert "~/ray_token" in cfg["file_mounts"]


def test_rayservice_api_needs_a_key_from_a_secret():
    svc = _load("rayservice.yaml")
    sc = yaml.safe_load(svc["spec"]["serveConfigV2"])
    args = sc["applications"][0]["args"]
    exposed = args["host"] not in ("127.0.0.1", "localhost") or sc["http_options"]["host"] not in ("127.0.0.1",)
    assert exposed and args["api_key_env"], "the RayService serves on the network without an API key"
    for c in _containers(svc["spec"]["rayClusterConfig"]):  # replicas may land on any node
        env = {e["name"]: e for e in c.get("env", [])}
        assert args["api_key_env"] in env, c["name"]
        assert "secretKeyRef" in env[args["api_key_env"]]["valueFrom"], c["name"]


def test_nginx_example_is_valid_with_and_without_its_throttle(tmp_path):
    """The shipped nginx.conf parses as it is and with its per-client throttle switched on (the
    commented block the docs tell users to uncomment)."""
    import re
    import shutil
    import subprocess

    import pytest

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    conf = (MANIFESTS / "nginx.conf").read_text()
    on = re.sub(r"^(\s*)# (limit_req|error_page 429)", r"\1\2", conf, flags=re.M)
    assert on != conf
    for name, text in (("off", conf), ("on", on)):
        (tmp_path / f"{name}.conf").write_text(text)
        r = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / f"{name}.conf")],
                           capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    assert "limit_req zone=per_client" in on and "\n        limit_req zone" in on


def _containers(spec):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_manifests_put_data_and_storage_on_an_object_store_with_credentials_from_outside():
    """Pods and nodes share no filesystem: the job reads data from and writes storage to S3, every
    pod gets the credentials from a Secret (or the cloud identity), and no manifest holds a key."""
    from negatron.cluster.config import load_config

    job = _load("rayjob.yaml")
    args = job["spec"]["entrypoint"].split()
    assert args[:4] == ["python", "-m", "negatron.cluster.cli", "train"]
    cfg = load_config(None, args[4:])  # the overrides are a valid config
    assert cfg.data.train.startswith("s3://") and cfg.data.dev.startswith("s3://")
    assert cfg.run.storage_path.startswith("s3://") and cfg.trainer.placement == "spread"
    for spec in (job["spec"]["rayClusterSpec"], _load("raycluster.yaml")["spec"]):
        for c in _containers(spec):
            assert {"secretRef": {"name": "negatron-s3", "optional": True}} in c.get("envFrom", []), c["name"]
    aws = _load("ray-cluster.aws.yaml")
    for name, node in aws["available_node_types"].items():
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"], name
    import re

    for f in MANIFESTS.iterdir():
        text = f.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f.name  # an AWS access key id
        # a secret's value written out (only placeholders "..." in the comments)
        assert not re.search(r"(?i)(secret_access_key|secret_key)\s*[:=]\s*(?!\.\.\.)[\w/+]{8,}", text), f.name

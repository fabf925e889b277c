"""Multi-node: a real `ray start --head` cluster from `negatron cluster up`, a job submitted with
`negatron submit train` whose workers are spread one per node with the same bank on both, a worker
killed on the second node, bad address / token."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_pairs

pytestmark = pytest.mark.ray


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "negatron.cluster.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _workers_on_node(root: str, node: str) -> list[int]:
    """RayTrainWorker processes under the raylet of one node of a `negatron cluster up` cluster."""
    from bench.loadgen import tagged_pids
    from negatron.cluster.multinode import our_processes

    raylets = [p.pid for p in our_processes(f"{root}/{node}") if "raylet" in " ".join(p.info["cmdline"] or [])[:200]]
    return [pid for r in raylets for pid in tagged_pids("RayTrainWorker", r)]


def test_cluster_up_submit_train_and_errors(tmp_path, tiny_model_dir, stdlib_data, s3, monkeypatch):
    """Two nodes that share nothing but an object store: data, model and storage are S3 URIs, each
    node fetches into its own cache, a worker on the second node is SIGKILLed, and the run resumes
    from the checkpoints in the store."""
    import signal
    import threading
    import time

    import httpx
    import psutil

    from negatron.cluster import storage
    from negatron.trainers.train import registered_steps

    env = {**os.environ, "NEGATRON_CLUSTER_DIR": str(tmp_path / "state")}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(k, None)
    r = _cli("cluster", "up", "--workers", "1", "--cpus-per-node", "2", env=env, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    # `cluster up` returns only once the Jobs API has run a job: a submit right after it works
    assert "waiting for the Jobs API" in r.stdout
    state = json.loads((tmp_path / "state" / "cluster.json").read_text())
    try:
        st = _cli("cluster", "status", env=env, timeout=120)
        assert st.returncode == 0 and "cluster at" in st.stdout, st.stdout + st.stderr
        model = s3.upload(tiny_model_dir, "cluster/model")
        train = s3.upload(write_pairs(tmp_path / "pairs.parquet", n=96), "cluster/pairs.parquet")
        dev = s3.upload(stdlib_data / "dev", "cluster/dev")
        cfg = tmp_path / "train.yaml"
        cfg.write_text(
            f"model: {{path: '{model}', max_length: 32}}\n"
            f"data: {{train: '{train}', dev: '{dev}', max_dev_queries: 10}}\n"
            "trainer: {num_workers: 2, cpus_per_worker: 0.5, batch_size: 4, max_steps: 24, checkpoint_every: 6,\n"
            "          placement: spread, max_failures: 1, keep_checkpoints: 10}\n"
            "bank: {size: 32, momentum: 0.9}\n"
            f"run: {{storage_path: '{s3.uri('cluster/runs')}'}}\n")

        def run_killing_node1_worker(name: str, *cmd: str, extra_env: dict | None = None):
            """Run a training command; SIGKILL the training worker on the second node once a
            checkpoint of run ``name`` is in the store; check the run resumed from it."""
            run_uri = s3.uri(f"cluster/runs/{name}")
            killed: list[int] = []

            def killer():
                deadline = time.time() + 600
                while not killed and time.time() < deadline:
                    victims = _workers_on_node(state["root"], "node1")
                    if victims and registered_steps(run_uri):
                        os.kill(victims[0], signal.SIGKILL)
                        killed.append(victims[0])
                    time.sleep(0.2)

            t = threading.Thread(target=killer, daemon=True)
            t.start()
            r = _cli(*cmd, "--config", str(cfg), f"run.name={name}", "optim.lr=1e-3",
                     env={**env, **(extra_env or {})}, timeout=900)
            t.join(5)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
            assert killed, "no training worker was found on the second node"
            assert storage.read_json(storage.join(run_uri, "metrics.json"))["steps"] == 24
            history = storage.read_json(storage.join(run_uri, "history.json"))
            resumes = [h["resumed_from"] for h in history if "resumed_from" in h]
            assert len(resumes) == 1 and resumes[0] % 6 == 0 and resumes[0] > 0, resumes
            return r, run_uri

        # the driver on this machine, attached to the cluster (token from the cluster's file); a
        # short run: the kill and the resume from the store are checked on the job below
        direct = _cli("train", "--address", state["address"], "--config", str(cfg), "run.name=direct",
                      "trainer.max_steps=6", env={**env, "RAY_AUTH_MODE": "token",
                                                  "RAY_AUTH_TOKEN_PATH": state["token_path"]}, timeout=900)
        assert direct.returncode == 0, (direct.stdout + direct.stderr)[-4000:]
        assert storage.read_json(s3.uri("cluster/runs/direct/metrics.json"))["steps"] == 6
        assert storage.exists(s3.uri("cluster/runs/direct/final/model.safetensors"))
        # a job through the Jobs API (the driver runs in the cluster too); a worker on the second
        # node is killed and the run resumes from the checkpoints in the store
        sub, run_uri = run_killing_node1_worker("job", "submit", "train", "--address", state["dashboard"])
        out = sub.stdout + sub.stderr
        job_id = next(line.split()[2].rstrip(":") for line in sub.stdout.splitlines() if line.startswith("submitted job"))
        # each node fetched the model into its own cache (the nodes share no folder for it)
        for node in ("head", "node1"):
            assert list((Path(state["root"]) / node / "negatron-cache" / "remote").glob("*/config.json")), node
        from transformers import AutoModel

        monkeypatch.setenv("NEGATRON_CACHE", str(tmp_path / "cache"))
        local = storage.local_folder(storage.join(run_uri, "final"))
        meta = json.loads((local / "negatron.json").read_text())
        assert meta["step"] == 24
        # placement spread: one worker on each node, and the bank identical on both after the resume
        placed, sums = meta["metrics"]["worker_nodes"], meta["metrics"]["bank_checksums"]
        assert len(placed) == 2 and len(set(placed)) == 2, placed
        assert len(sums) == 2 and sums[0] == sums[1], sums
        AutoModel.from_pretrained(local)  # final/ downloaded from the store loads in transformers
        assert not (tmp_path / "runs").exists()
        logs = _cli("jobs", "logs", job_id, "--address", state["dashboard"], env=env, timeout=120)
        assert '"samples_per_s"' in logs.stdout and "final model:" in logs.stdout
        status = _cli("jobs", "status", job_id, "--address", state["dashboard"], env=env, timeout=120)
        assert "SUCCEEDED" in status.stdout
        assert open(state["token_path"]).read().strip() not in out  # the token is never printed
        # token authentication is on: the Jobs API refuses a request without the token
        anon = httpx.get(state["dashboard"] + "/api/jobs/", timeout=30)
        assert anon.status_code in (401, 403), anon.status_code

        bad = _cli("jobs", "list", "--address", "http://127.0.0.1:9", env=env, timeout=120)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
        assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in bad.stderr
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        tok = _cli("jobs", "list", "--address", state["dashboard"],
                   env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
        assert tok.returncode == 2 and "authentication failed" in tok.stderr and tok.stderr.strip().count("\n") == 0
    finally:
        down = _cli("cluster", "down", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    left = [p for p in psutil.process_iter(["cmdline"]) if any(state["root"] in c for c in (p.info["cmdline"] or []))]
    assert not left, "cluster processes survived `negatron cluster down`"

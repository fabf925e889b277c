"""The training driver interrupted with SIGTERM (a batch scheduler's or `kill`'s stop), then the same
command run again. SIGTERM goes the way of Ctrl-C (``cluster.local.stop_on_sigterm``); Ctrl-C itself
is what the Tune resume test sends (`tests/test_tune_ray.py`).

This module starts no Ray of its own: each `negatron train` process runs the embedded local Ray,
so only one Ray instance is alive at a time.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from negatron.cluster.config import load_config
from negatron.trainers.train import registered_steps
from tests.test_train_ray import check_resumes, expected_data_digest

pytestmark = pytest.mark.ray


def test_sigterm_then_same_command_resumes_and_finishes(tmp_path, tiny_model_dir, stdlib_data):
    overrides = [f"model.path={tiny_model_dir}", f"data.train={stdlib_data / 'train.parquet'}",
                 f"data.dev={stdlib_data / 'dev'}", "data.max_dev_queries=20", "model.max_length=48",
                 "trainer.num_workers=2", "trainer.batch_size=8", "trainer.cpus_per_worker=0.5",
                 "optim.lr=1e-3", "trainer.max_steps=80", "trainer.checkpoint_every=10",
                 "trainer.keep_checkpoints=100", "bank.size=50", "bank.momentum=0.5",
                 f"run.storage_path={tmp_path}", "run.name=sigint"]
    cmd = [sys.executable, "-m", "negatron.cluster.cli", "train", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "sigint"

    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 900  # a hang guard, generous for a loaded machine
        while len(registered_steps(run_dir)) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the run ended before it could be interrupted:\n" + "".join(lines[-30:])
        assert len(registered_steps(run_dir)) >= 2, "no checkpoint in time:\n" + "".join(lines[-30:])
        first.send_signal(signal.SIGTERM)
        rc = first.wait(120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    reader.join(10)
    out = "".join(lines)
    assert rc == 130, out[-3000:]
    assert "interrupted" in out and "run the same command again to resume" in out, out[-2000:]
    assert "SIGTERM received" not in out, out[-2000:]  # Ray's native handler dumped a stack here
    deadline = time.time() + 30  # ray.shutdown() stops its processes on the way out; give them a moment
    while _ray_processes_of(first.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_of(first.pid), "the embedded Ray outlived its driver"
    assert not (run_dir / "final").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    resumed = check_resumes(run_dir, history, 10)
    assert len(resumed) == 1 and resumed[0] >= 20
    final = json.loads((run_dir / "final" / "negatron.json").read_text())
    assert final["step"] == 80
    cfg = load_config(None, overrides)
    assert final["metrics"]["data_digest"] == expected_data_digest(cfg, 80)


def _ray_processes_of(driver_pid: int) -> list[str]:
    """Command lines of the processes of the Ray session ``driver_pid`` started (its folder,
    ``<temp>/ray/session_<time>_<pid>``, is named after the driver)."""
    import tempfile
    from pathlib import Path

    from negatron.cluster.multinode import our_processes

    sessions = [p.name for p in Path(tempfile.gettempdir(), "ray").glob(f"session_*_{driver_pid}")]
    return [" ".join(p.info["cmdline"] or [])[:200] for s in sessions for p in our_processes(s)]

"""Real Ray Tune runs: ASHA over whole 2-worker Ray Train trials, results written, resume.

Only the ASHA test runs 2-worker trials; the resume and failure tests check Tune's side (restore,
errors) with 1-worker trials, which start in half the time here. PBT (exploitation, mutations kept
through the restore) runs with its storage on S3, in ``test_storage_ray.py``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from negatron.cluster.config import ConfigError, load_config
from negatron.tune.search import check_space, run_tune
from tests.helpers import write_synthetic_task

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    # the dashboard serves the state API Ray Train's placement-group cleaner needs (see cluster/local.py)
    from negatron.cluster.local import init_local
    init_local(num_cpus=4, include_dashboard=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_synthetic_task(tmp_path_factory.mktemp("task"))


def _config_file(tmp_path, tiny_model_dir, task, name):
    cfg = {
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"train": str(task / "train.parquet"), "dev": str(task / "dev")},
        "trainer": {"num_workers": 2, "batch_size": 8, "max_steps": 32, "checkpoint_every": 8, "log_every_s": 60},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "run": {"name": name, "storage_path": str(tmp_path / "exp")},
        "tune": {
            # two learning rates that learn and two that cannot: ASHA must stop a weak one early
            "space": {"optim.lr": {"grid": [3e-3, 1e-3, 1e-7, 1e-8]},
                      "loss.temperature": {"loguniform": [0.03, 0.3]}},
            "num_samples": 1, "max_concurrent_trials": 2, "grace_period": 1, "reduction_factor": 2,
        },
    }
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_space_validated_before_any_trial(tmp_path, tiny_model_dir, task):
    f = _config_file(tmp_path, tiny_model_dir, task, "bad")
    with pytest.raises(ConfigError, match="space key 'loss.temprature'"):
        load_config(f, ["tune.space={loss.temprature: {uniform: [0.1, 0.2]}}"])
    cfg = load_config(f, ["tune.space={trainer.batch_size: {choice: [8, 0]}}"])
    with pytest.raises(ConfigError, match=r"tune.space\['trainer.batch_size'\].choice: value 0 is not valid"):
        check_space(cfg)
    with pytest.raises(ConfigError, match="low must be > 0"):
        load_config(f, ["tune.space={loss.temperature: {loguniform: [0, 0.2]}}"])


def test_asha_stops_weak_trials_and_best_config_trains(tmp_path, tiny_model_dir, task):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, task, "asha"))
    out = run_tune(cfg)
    rows = out.rows
    assert len(rows) == 4
    statuses = [r["status"] for r in rows]
    assert "STOPPED_EARLY" in statuses, statuses
    assert "TERMINATED" in statuses
    table = pq.read_table(out.experiment_dir / "results.parquet").to_pylist()
    assert {r["trial_id"] for r in table} == {r["trial_id"] for r in rows}
    assert all(r["optim.lr"] in (3e-3, 1e-3, 1e-7, 1e-8) for r in table)
    assert (out.experiment_dir / "tune.png").stat().st_size > 1000
    best = load_config(out.best_config_path)
    assert best.optim.lr in (3e-3, 1e-3)  # a learning trial wins
    assert out.best_metric > max(r["dev_mrr@10"] or 0 for r in rows if r["optim.lr"] < 1e-6)
    assert Path(out.best_checkpoint, "config.json").is_file()
    # the best config feeds straight back into training: a whole, valid config (the schema) whose
    # inputs pass the pre-Ray checks `negatron train` makes (a training run itself is ~25 s of Ray
    # Train start-up here, and the other tests train)
    from negatron.trainers.train import validate_inputs
    validate_inputs(best)
    assert best.trainer.max_steps == 32 and best.model.path == str(tiny_model_dir)


def _trial_reports(exp: Path) -> dict[str, int]:
    out = {}
    for rj in exp.glob("trial_fn_*/result.json"):
        out[rj.parent.name.split("_")[3]] = sum(1 for line in rj.read_text().splitlines() if line.strip())
    return out


def test_interrupted_experiment_resumes_without_redoing_finished_trials(tmp_path, tiny_model_dir, task):
    f = _config_file(tmp_path, tiny_model_dir, task, "resume")
    exp = tmp_path / "exp" / "resume"
    # two trials, one at a time: the interrupt lands after the first finished, in the second
    cmd = [sys.executable, "-m", "negatron.cluster.cli", "tune", "--config", str(f),
           "tune.scheduler=fifo", "tune.max_concurrent_trials=1", "trainer.num_workers=1",
           "tune.space={optim.lr: {grid: [3e-3, 1e-3]}}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    def finished_trials(reports: dict[str, int]) -> dict[str, int]:
        # one trial at a time, in order: a trial with all 4 reports is surely finished once a later
        # trial has reported (its 4th report alone can come before Tune marks it TERMINATED)
        started = [t for t, n in reports.items() if n >= 1]
        return {t: n for t, n in reports.items() if n >= 4 and any(u > t for u in started)}

    try:
        deadline = time.time() + 900  # a hang guard (~150 s alone), generous for a loaded machine
        while time.time() < deadline and proc.poll() is None:
            done = finished_trials(_trial_reports(exp))
            if done:
                break
            time.sleep(0.5)
        # an early exit (once: Ray's raylet aborted at start on a machine loaded by a bench) says why
        assert proc.poll() is None, f"the experiment ended before the interrupt:\n{log.read_text()[-3000:]}"
        assert done, "no trial finished in time"
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = finished_trials(_trial_reports(exp))
    assert len(finished) == 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming the experiment" in r.stdout
    after = _trial_reports(exp)
    for t, n in finished.items():
        assert after[t] == n, f"finished trial {t} was run again"
    rows = pq.read_table(exp / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(row["status"] == "TERMINATED" for row in rows), rows


def test_a_failing_trial_is_errored_and_the_rest_completes(tmp_path, tiny_model_dir, task):
    """One trial's training file lacks a column: that trial is ERROR with the message, the other
    finishes and wins; running the experiment again redoes neither."""
    from negatron.tune.results import format_rows

    bad = tmp_path / "broken.parquet"
    t = pq.read_table(task / "train.parquet")
    pq.write_table(t.drop_columns(["positive"]), bad)
    f = _config_file(tmp_path, tiny_model_dir, task, "faulty")
    space = f"tune.space={{data.train: {{grid: [{task / 'train.parquet'}, {bad}]}}}}"
    cfg = load_config(f, [space, "tune.scheduler=fifo", "trainer.max_steps=16", "trainer.num_workers=1"])
    out = run_tune(cfg)
    by_status = {r["status"]: r for r in out.rows}
    assert set(by_status) == {"ERROR", "TERMINATED"}, out.rows
    assert "missing column" in by_status["ERROR"]["error"] and "positive" in by_status["ERROR"]["error"]
    assert "missing column" in format_rows(out.rows, cfg)
    assert load_config(out.best_config_path).data.train == str(task / "train.parquet")
    table = pq.read_table(out.experiment_dir / "results.parquet").to_pylist()
    assert sorted(r["status"] for r in table) == ["ERROR", "TERMINATED"]
    reports = _trial_reports(out.experiment_dir)
    again = run_tune(cfg)  # same experiment: restored, nothing re-run
    assert _trial_reports(out.experiment_dir) == reports
    assert sorted(r["status"] for r in again.rows) == ["ERROR", "TERMINATED"]


def test_workers_know_their_own_cluster_address():
    """Ray's state API, which Ray Train's placement-group cleaner polls from inside the cluster,
    finds "the" cluster by RAY_ADDRESS or else by the GCS processes running on the machine. With
    a second local Ray beside this one (a `negatron serve` next to a `negatron tune`, or a bench
    beside the tests) the search failed with "Found multiple active Ray instances": the cleaner
    died, a stopped trial's placement group was never freed and the next trials waited for CPUs
    until they timed out. ``init_local`` hands every worker RAY_ADDRESS, so the search never runs."""

    @ray.remote(num_cpus=0.1)
    def resolve():
        from ray._private.services import canonicalize_bootstrap_address_or_die
        from ray.util.state import list_nodes

        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None), len(list_nodes())

    env_address, address, nodes = ray.get(resolve.remote(), timeout=120)
    assert env_address == address == ray.get_runtime_context().gcs_address
    assert nodes == 1  # the state API answered through that address

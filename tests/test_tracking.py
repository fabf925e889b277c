"""run.tracking: TensorBoard event files and an MLflow file store written by rank 0 and read back
by their own readers; bank health in the history. In-process runs (the loop, no Ray)."""

import pytest

from negatron.cluster.config import ConfigError, load_config
from negatron.trainers.checkpoint import read_meta
from negatron.trainers.loop import run_worker
from tests.helpers import write_pairs

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _run(tmp_path, tiny_model_dir, tracking, *extra):
    train = write_pairs(tmp_path / "p.parquet", n=48)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={train}", "trainer.batch_size=8",
                             "model.max_length=32", "bank.size=16", "bank.momentum=0.9", "trainer.max_steps=6",
                             "trainer.checkpoint_every=3", "trainer.log_every_s=0.001", f"run.tracking={tracking}",
                             f"run.storage_path={tmp_path / 'runs'}", "run.name=tracked", *extra])
    last = {}

    def report(metrics, d):
        if d:
            last["meta"] = read_meta(d)

    run_worker(cfg, 0, 1, report, log=lambda s: None)
    return tmp_path / "runs" / "tracked", last["meta"]


def test_tensorboard_events_hold_the_progress_and_bank_health(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, meta = _run(tmp_path, tiny_model_dir, "tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "temperature", "samples_per_s", "lr", "bank_fill", "bank_mean_age", "bank_masked_share"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 7))
    fills = [e.value for e in acc.Scalars("bank_fill")]
    assert fills == [8, 16, 16, 16, 16, 16]  # 8 keys a step into 16 slots
    assert all(0 <= e.value <= 1 for e in acc.Scalars("bank_masked_share"))
    # the same numbers are in the run's history
    entries = [h for h in meta["history"] if "bank_mean_age" in h]
    assert len(entries) == 6 and entries[-1]["bank_fill"] == 16
    assert entries[0]["bank_mean_age"] == pytest.approx(1.0)  # written at step 0, read after step 1


def test_mlflow_file_store_holds_params_and_metrics(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    run_dir, _ = _run(tmp_path, tiny_model_dir, "mlflow")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("negatron")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["trainer.batch_size"] == "8" and run.data.params["bank.size"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    assert client.get_metric_history(run.info.run_id, "bank_fill")[-1].value == 16


def test_a_missing_tracking_package_is_a_config_error(monkeypatch):
    import builtins

    from negatron.trainers.tracking import require

    real = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow":
            raise ImportError("no mlflow")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match=r"run.tracking: mlflow needs the mlflow package.*negatron\[tracking\]"):
        require("mlflow")
    require("none")

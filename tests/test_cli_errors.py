"""Bad input on the command line: one line `negatron: error: ...` (or argparse's one line), exit 2,
never a traceback, never torch's `weights_only=False` advice. No Ray is started."""

import shutil

import pytest
import torch

from negatron.cluster import cli
from tests.helpers import write_pairs


def run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse refuses before any command runs
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(rc, err, *fragments):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["mine", "--model", "default", "--data", "x.parquet", "--out", "y.parquet", "--k", "0"], "--k: must be >= 1"),
    (["eval", "--model", "default", "--data", "d", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["eval", "--model", "default", "--data", "d", "--threads", "-1"], "--threads: must be >= 1"),
    (["quickstart", "--threads", "two"], "expected an integer"),
    (["cluster", "up", "--cpus-per-node", "inf"], "finite number"),
])
def test_bad_flag_values(argv, fragment, capsys):
    assert_one_line(*run(argv, capsys), fragment)


def test_mine_k_zero_from_python_is_a_config_error(tmp_path):
    from negatron.cluster.config import ConfigError
    from negatron.trainers.mine import mine

    with pytest.raises(ConfigError, match="--k >= 1"):
        mine("default", write_pairs(tmp_path / "p.parquet"), tmp_path / "o.parquet", k=0)


def test_mine_refuses_to_overwrite_its_input(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.parquet")
    before = data.read_bytes()
    assert_one_line(*run(["mine", "--model", "default", "--data", str(data), "--out", str(data)], capsys),
                    "is an input of this run")
    assert data.read_bytes() == before


def test_config_that_is_not_utf8(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"run:\n  name: caf\xe9\n")
    assert_one_line(*run(["train", "--config", str(f)], capsys), str(f), "not UTF-8")


def test_corrupt_parquet_pages(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.parquet", n=2000)
    raw = bytearray(data.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    for i in range(8, len(raw) - footer - 8, 5):
        raw[i] ^= 0x5A
    data.write_bytes(bytes(raw))
    assert_one_line(*run(["mine", "--model", "default", "--data", str(data), "--out", str(tmp_path / "o.parquet")],
                         capsys), str(data), "corrupt Parquet")


def test_output_path_that_is_a_folder(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert_one_line(*run(["serve", "build", "--model", "default", "-o", str(out)], capsys), str(out))
    assert_one_line(*run(["data", "stdlib", "--out", str(tmp_path / "file.txt")] if
                         (tmp_path / "file.txt").write_text("x") else [], capsys), "file.txt")


def test_pickled_weights_are_refused_in_one_line_without_torchs_advice(tmp_path, capsys, tiny_model_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    for p in folder.glob("*.safetensors"):
        p.unlink()
    torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    eval_dir = tmp_path / "eval"
    from tests.helpers import write_synthetic_task

    write_synthetic_task(eval_dir)
    rc, err = run(["eval", "--model", str(folder), "--data", str(eval_dir / "dev")], capsys)
    assert_one_line(rc, err, "pytorch_model.bin", "safetensors")
    assert "weights_only" not in err
    # `negatron serve` refuses it on the driver, before any replica would try to load it
    from negatron.cluster.config import ConfigError, load_config
    from negatron.serve.app import app_builder, resolve_section

    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        app_builder(resolve_section(load_config(None, [f"serve.encoder.path={folder}"])))


def test_serve_start_failures_are_one_line():
    from negatron.serve.app import short_serve_error

    msg = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor "
           "or initial health check failing. See controller logs for details. Error:\n"
           "ray::ServeReplica:negatron:Ingress.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)\n"
           "  File \"/x/api.py\", line 400, in __init__\n    raise RuntimeError(...)\n"
           "RuntimeError: serve.api_key_env names 'KEY', but that environment variable is not set\n")
    assert short_serve_error(msg) == ("RuntimeError: serve.api_key_env names 'KEY', but that environment "
                                      "variable is not set")


def test_use_gpu_without_a_gpu_is_an_error_not_a_silent_cpu_run(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """On the embedded Ray the workers run here: no CUDA GPU here means a one-line error before
    Ray starts (and a worker that sees no GPU raises instead of falling back to the CPU)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("NEGATRON_RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pairs = write_pairs(tmp_path / "p.parquet", n=48)
    rc = cli.main(["train", f"model.path={tiny_model_dir}", f"data.train={pairs}", "trainer.use_gpu=true",
                   f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "trainer.use_gpu is true, but this machine has no CUDA GPU" in err
    assert not (tmp_path / "runs").exists()


def test_a_missing_guide_model_is_one_line_before_ray(tmp_path, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("NEGATRON_RAY_ADDRESS", raising=False)
    pairs = write_pairs(tmp_path / "p.parquet", n=48)
    rc = cli.main(["train", f"model.path={tiny_model_dir}", f"data.train={pairs}",
                   f"loss.guide_model={tmp_path / 'nope'}", f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("negatron: error: loss.guide_model: model folder not found") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()

"""Config files and values that used to fail late, hang or lose data (hardening round two)."""

import time

import pytest

from negatron.cluster.config import ConfigError, load_config


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"loss: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb())
    assert len(f.read_bytes()) < 600
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert time.monotonic() - t0 < 30  # a generous bound: before the fix it expanded 9**9 nodes
    msg = str(e.value)
    assert "alias" in msg and len(msg) < 1000


def test_duplicate_keys_are_an_error_naming_the_key(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("trainer:\n  batch_size: 8\n  max_steps: 10\n  batch_size: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "duplicate key 'batch_size'" in str(e.value) and "line 2" in str(e.value)


def test_merge_keys_still_work(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {temperature: 0.1, symmetric: true}\n")
    f.write_text("loss:\n  <<: {temperature: 0.1, symmetric: true}\n  temperature: 0.2\n")
    cfg = load_config(f)
    assert cfg.loss.temperature == 0.2 and cfg.loss.symmetric is True


def test_long_values_are_shortened_in_errors():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.storage_path=[" + ", ".join(["abcdefgh" * 10] * 5000) + "]"])
    assert len(str(e.value)) < 1000


def test_config_file_that_is_not_utf8(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(f)


@pytest.mark.parametrize("name", [".", ".."])
def test_run_name_dot_and_dotdot_are_refused(name):
    with pytest.raises(ConfigError, match="not a folder name"):
        load_config(None, [f"run.name={name}"])


@pytest.mark.parametrize("override", [
    "trainer.cpus_per_worker=.inf", "optim.weight_decay=.inf", "serve.startup_timeout_s=.inf",
    "loss.temperature=.nan", "serve.encoder.scale.num_cpus=.inf",
    "bank.size=1e14", "trainer.seed=1e29", "trainer.seed=-1", "serve.retriever.rerank_depth=100000",
])
def test_values_that_used_to_fail_inside_ray_are_refused_on_load(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value)


def test_serve_flags_are_strings_not_yaml(tmp_path, monkeypatch):
    """`--host ::` and `--model "dir #x"` reach the config as typed (they used to be re-parsed)."""
    from negatron.cluster import cli

    seen = {}
    monkeypatch.setattr("negatron.serve.app.run_until_signal", lambda section, address=None: seen.update(s=section))
    model = tmp_path / "dir #x"
    model.mkdir()
    cli.main(["serve", "--host", "::", "--model", str(model), "--port", "8123"])
    s = seen["s"]
    assert s.host == "::" and s.port == 8123 and s.encoder.path == str(model.resolve())

import pytest

from negatron.cluster.config import Config, ConfigError, all_keys, dump_yaml, load_config, parse_override


def test_defaults_and_round_trip():
    cfg = Config()
    d = cfg.to_dict()
    assert Config.from_dict(d) == cfg
    assert Config.from_dict(d).to_dict() == d


def test_yaml_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  temperature: 0.1\ntrainer:\n  batch_size: 8\n")
    cfg = load_config(f, ["loss.temperature=0.2", "bank.size=1024", "augment.crop=true", "run.name=abc"])
    assert cfg.loss.temperature == 0.2
    assert cfg.trainer.batch_size == 8
    assert cfg.bank.size == 1024 and cfg.augment.crop is True and cfg.run.name == "abc"
    # a dumped config loads back to the same thing
    g = tmp_path / "d.yaml"
    g.write_text(dump_yaml(cfg))
    assert load_config(g) == cfg


@pytest.mark.parametrize("override, key, fragment", [
    ("loss.temperature=0", "loss.temperature", "greater than 0"),
    ("loss.temperature=-1", "loss.temperature", "greater than 0"),
    ("trainer.batch_size=0", "trainer.batch_size", "greater than or equal to 1"),
    ("bank.size=-5", "bank.size", "greater than or equal to 0"),
    ("bank.momentum=1.0", "bank.momentum", "less than 1"),
    ("trainer.num_workers=two", "trainer.num_workers", "valid integer"),
    ("model.pooling=max", "model.pooling", "'mean' or 'cls'"),
    ("optim.lr=0", "optim.lr", "greater than 0"),
    ("augment.mask_prob=1.5", "augment.mask_prob", "less than or equal to 0.9"),
])
def test_rejections_name_key_value_and_rule(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and fragment in msg
    assert repr(parse_override(override)[1]) in msg  # the bad value is shown


def test_unknown_keys_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'loss.temprature'"):
        load_config(None, ["loss.temprature=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  temprature: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "loss.temprature" in str(e.value) and "temperature" in str(e.value) and str(f) in str(e.value)
    f.write_text("losses: {}\n")
    with pytest.raises(ConfigError, match="losses"):
        load_config(f)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    f.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["loss.temperature"])


def test_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.loss.temperature = 3.0  # type: ignore[misc]


def test_all_keys_cover_contract():
    keys = set(all_keys())
    for k in ["data.train", "data.dev", "model.path", "model.max_length", "trainer.num_workers",
              "trainer.batch_size", "trainer.max_steps", "trainer.max_failures", "optim.lr",
              "loss.temperature", "bank.size", "bank.momentum", "run.name", "run.storage_path"]:
        assert k in keys


def test_shipped_configs_load():
    from pathlib import Path

    for f in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(f)


def test_exponent_floats_are_numbers_not_strings(tmp_path):
    """PyYAML's YAML 1.1 rules read `1e-3` as a string; configs and overrides read it as a float."""
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 3e-5\ntune:\n  space:\n    optim.lr: {grid: [1e-3, 2E-4]}\n")
    cfg = load_config(f, ["loss.temperature=5e-2"])
    assert cfg.optim.lr == 3e-5 and cfg.loss.temperature == 0.05
    assert cfg.tune.space["optim.lr"]["grid"] == [1e-3, 2e-4]
    assert all(isinstance(v, float) for v in cfg.tune.space["optim.lr"]["grid"])


def test_bank_prefill_refused_for_images():
    with pytest.raises(ConfigError, match="bank.prefill is for text encoders"):
        load_config(None, ["model.kind=image", "bank.size=64", "bank.prefill=true"])
    assert load_config(None, ["bank.size=64", "bank.prefill=true"]).bank.prefill is True

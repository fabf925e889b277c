"""docs/configuration.md is generated from the config schema and must match it."""

from pathlib import Path

from negatron.cluster.config import Config, load_config
from negatron.cluster.config_reference import render, rows, sections

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_reference_matches_the_schema():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m negatron.cluster.config_reference > docs/configuration.md`")


def test_every_key_is_listed_with_a_description():
    listed = {key for name, model in sections() for key, *_ in rows(model, f"{name}.")}
    defaults = load_config(None, []).model_dump()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" in {n for n, _ in sections()}:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert set(leaves(defaults)) == listed
    missing = [key for name, model in sections() for key, _, _, _, desc in rows(model, f"{name}.") if not desc]
    assert not missing, f"config keys without a description: {missing}"
    assert {n for n, _ in sections()} >= set(Config.model_fields)


def test_reference_shows_types_defaults_and_ranges():
    text = render()
    assert "| `trainer.max_steps` | int | `100` | ≥ 1 |" in text
    assert '`"bi-encoder"` \\| `"cross-encoder"` \\| `"image"`' in text
    assert "| `serve.limits.max_request_pixels` |" in text

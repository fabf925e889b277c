"""Shared fixtures. Tests build tiny models from a config: no hub, no downloads."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """The built-in dataset, built once per test session."""
    from negatron.trainers.stdlib_data import build_stdlib_dataset

    out = tmp_path_factory.mktemp("stdlib")
    build_stdlib_dataset(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny BERT (2 layers, hidden 32) with the packaged MiniLM tokenizer, saved as a Negatron folder."""
    from tests.helpers import make_tiny_encoder

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_encoder().save(out)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting Ray costs ~15 s here); modules opt in with
    ``pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]``."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()

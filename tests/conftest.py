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

    from negatron.cluster.local import init_local

    init_local(num_cpus=4, include_dashboard=False)  # workers get RAY_ADDRESS: another Ray here cannot confuse them
    yield
    ray.shutdown()


class S3:
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 with one bucket."""

    bucket = "negatron-test"

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"

    def uri(self, key: str = "") -> str:
        """``s3://bucket/key?endpoint_override=...&scheme=http`` (the query the issue names)."""
        return f"s3://{self.bucket}/{key.strip('/')}?endpoint_override={self.endpoint}&scheme=http"

    def upload(self, local, key: str) -> str:
        """Copy a local file or folder to ``key``; returns its URI."""
        from pathlib import Path

        from negatron.cluster import storage

        local = Path(local)
        if local.is_dir():
            storage.put_folder(local, self.uri(key))
        else:
            storage.upload_file(local, self.uri(key))
        return self.uri(key)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """Start ``moto_server`` on a free port (stopped by PID at the end), credentials in the
    environment (as users set them; Ray workers started later inherit them), one bucket."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "negatron-test", "AWS_SECRET_ACCESS_KEY": "negatron-test-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[k] = v
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        from tests.helpers import wait_for_port

        try:
            wait_for_port(port, proc, 60, "moto_server")
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {log.read_text()[-2000:]}") from None
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(S3.bucket)
        yield S3(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

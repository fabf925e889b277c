"""Local paths and object-store URIs (cluster/storage.py), against a real S3-compatible server."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negatron.cluster import storage
from negatron.cluster.config import ConfigError, load_config


def test_join_keeps_the_query_at_the_end():
    base = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(base, "NAME") == "s3://bucket/runs/NAME?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(base, "NAME", "final/") == "s3://bucket/runs/NAME/final?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("gs://b/x/", "y") == "gs://b/x/y"
    assert storage.join("runs", "a", "b") == "runs/a/b"
    assert storage.name(storage.join(base, "NAME")) == "NAME"
    assert storage.parent(storage.join(base, "NAME")) == base
    assert storage.is_remote(base) and not storage.is_remote("file:///tmp/x") and storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("runs/x") and not storage.is_uri("C:/x")


def test_credentials_in_a_uri_are_refused_and_never_printed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.storage_path=s3://b/runs?access_key=AKIA1&secret_key=hunter2"])
    msg = str(e.value)
    assert "run.storage_path" in msg and "environment" in msg and "hunter2" not in msg and "AKIA1" not in msg
    assert storage.redact("s3://b/x?secret_key=hunter2&region=eu") == "s3://b/x?secret_key=***&region=eu"
    # an ordinary query is kept byte for byte
    assert storage.redact("s3://b/x?endpoint_override=h%3A1") == "s3://b/x?endpoint_override=h%3A1"


def test_a_path_on_a_store_becomes_its_uri():
    """Ray names a checkpoint on S3 ``bucket/key``: ``uri_on`` gives it back its scheme and query."""
    base = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.uri_on(base, "bucket/runs/x/checkpoint_1") == \
        "s3://bucket/runs/x/checkpoint_1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.uri_on("s3://bucket/runs", "bucket/y") == "s3://bucket/y"
    assert storage.uri_on(base, "s3://other/z") == "s3://other/z"  # already a URI
    assert storage.uri_on("/local/runs", "/local/runs/x") == "/local/runs/x"


def test_round_trip_files_folders_and_atomic_outputs(s3, tmp_path):
    base = s3.uri("unit/roundtrip")
    storage.write_json(storage.join(base, "m.json"), {"a": 1})
    assert storage.read_json(storage.join(base, "m.json")) == {"a": 1}
    assert storage.read_json(storage.join(base, "absent.json")) is None
    assert storage.is_file(storage.join(base, "m.json")) and storage.is_dir(base)
    storage.write_with(storage.join(base, "t.parquet"), lambda p: pq.write_table(pa.table({"x": [1, 2]}), p))
    assert pq.read_table(storage.join(base, "t.parquet")).num_rows == 2  # pyarrow reads the URI as it is

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    (src / "train_state").mkdir()
    (src / "train_state" / "opt.pt").write_bytes(b"x")
    dst = storage.join(base, "final")
    storage.put_folder(src, dst, ignore=("train_state",))
    assert [f for f, _, _ in storage.list_files(dst)] == ["config.json", "sub/w.bin"]
    (src / "sub" / "w.bin").unlink()  # a second export replaces the folder: stale files go
    storage.put_folder(src, dst, ignore=("train_state",))
    assert [f for f, _, _ in storage.list_files(dst)] == ["config.json"]


def test_a_remote_folder_is_fetched_once_into_the_cache(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"v": 1}))
    uri = s3.upload(src, "unit/cache/m")
    first = storage.local_folder(uri)
    assert json.loads((first / "config.json").read_text()) == {"v": 1}
    assert storage.local_folder(uri) == first  # unchanged: not fetched again
    (src / "config.json").write_text(json.dumps({"v": 2, "changed": True}))
    s3.upload(src, "unit/cache/m")
    second = storage.local_folder(uri)
    assert second != first and json.loads((second / "config.json").read_text())["v"] == 2
    # keyed by content: the same files at another URI are the same local folder
    assert storage.local_folder(s3.upload(src, "unit/cache/copy-of-m")) == second


def test_store_errors_are_one_line_naming_the_uri(s3):
    missing = f"s3://no-such-bucket-x/k?endpoint_override={s3.endpoint}&scheme=http"
    with pytest.raises(storage.StorageError, match="cannot read s3://no-such-bucket-x/k.*not found"):
        storage.read_bytes(missing)
    closed = "s3://b/k?endpoint_override=127.0.0.1:1&scheme=http"
    with pytest.raises(storage.StorageError, match="127.0.0.1:1.*cannot be reached"):
        storage.read_bytes(closed)
    with pytest.raises(storage.StorageError, match="not a usable URI"):
        storage.read_bytes("nosuchscheme://x/y")


def test_cli_names_an_unreachable_store_in_one_line(tmp_path, tiny_model_dir):
    from tests.helpers import write_pairs

    data = write_pairs(tmp_path / "pairs.parquet")
    r = subprocess.run([sys.executable, "-m", "negatron.cluster.cli", "train", f"data.train={data}",
                        f"model.path={tiny_model_dir}",
                        "run.storage_path=s3://b/runs?endpoint_override=127.0.0.1:1&scheme=http"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("negatron: error:") and "127.0.0.1:1" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_schema_check_reads_a_uri_and_names_it(s3, tmp_path):
    from negatron.trainers.schema import SchemaError, check_pairs

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query": ["q"], "positive": ["p"], "query_id": ["1"]}), bad)
    uri = s3.upload(bad, "unit/schema/bad.parquet")
    with pytest.raises(SchemaError, match=r"s3://negatron-test/unit/schema/bad.parquet.*missing column.*positive_id"):
        check_pairs(uri)
    with pytest.raises(SchemaError, match="file not found"):
        check_pairs(s3.uri("unit/schema/none.parquet"))

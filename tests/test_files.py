"""Outputs are replaced atomically: a failure mid-write leaves the previous file or folder whole."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negatron.cluster.files import atomic_write, replace_folder, write_json, write_parquet


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})

    def crash(tmp):
        tmp.write_text('{"a": ')  # half written
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_parquet_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "train.parquet"
    write_parquet(pa.table({"x": [1, 2]}), target)
    with pytest.raises(Exception):
        write_parquet("not a table", target)
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]


def test_folder_swap_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "final"
    replace_folder(final, lambda t: (t.mkdir(), (t / "model.safetensors").write_text("old")))

    def crash(t):
        t.mkdir()
        (t / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_folder(final, crash)
    assert (final / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    replace_folder(final, lambda t: (t.mkdir(), (t / "model.safetensors").write_text("new")))
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_stdlib_dataset_writes_train_parquet_last(tmp_path, monkeypatch):
    """The quickstart takes an existing train.parquet for a finished dataset: a crash while writing
    the dev/test splits must not leave one."""
    import negatron.trainers.stdlib_data as sd

    real = sd._write

    def failing(path, columns):
        if path.name == "qrels.parquet" and path.parent.name == "test":
            raise OSError(28, "No space left on device")
        return real(path, columns)

    monkeypatch.setattr(sd, "_write", failing)
    with pytest.raises(OSError):
        sd.build_stdlib_dataset(tmp_path / "data")
    assert not (tmp_path / "data" / "train.parquet").exists()

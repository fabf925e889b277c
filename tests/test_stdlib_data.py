import hashlib

import pyarrow.parquet as pq

from negatron.trainers.schema import check_eval_dir, check_pairs
from negatron.trainers.stdlib_data import build_stdlib_dataset, first_sentence


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def test_deterministic_bytes(stdlib_data, tmp_path):
    build_stdlib_dataset(tmp_path)
    assert _digest(tmp_path) == _digest(stdlib_data)
    assert len(_digest(tmp_path)) == 7


def test_splits_disjoint_and_valid(stdlib_data):
    train = check_pairs(stdlib_data / "train.parquet")
    dev = check_eval_dir(stdlib_data / "dev")
    test = check_eval_dir(stdlib_data / "test")
    assert train.num_rows > 1500
    assert dev.queries.num_rows > 200 and test.queries.num_rows > 700
    tr_q = set(train.column("query_id").to_pylist())
    tr_d = set(train.column("positive_id").to_pylist())
    sets = {"train": (tr_q, tr_d)}
    for name, ev in (("dev", dev), ("test", test)):
        sets[name] = (set(ev.queries.column("query_id").to_pylist()), set(ev.corpus.column("doc_id").to_pylist()))
        # distractors make the corpus larger than the set of judged docs
        assert ev.corpus.num_rows > ev.qrels.num_rows
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a][0] & sets[b][0], (a, b)
            assert not sets[a][1] & sets[b][1], (a, b)
    assert len(train.column("positive_id").to_pylist()) == len(tr_d)  # no duplicate positives


def test_pairs_look_right(stdlib_data):
    t = pq.read_table(stdlib_data / "train.parquet").to_pylist()
    for row in t[:200]:
        assert len(row["query"].split()) >= 5
        assert row["positive"].lstrip().startswith(("def ", "async def "))
        assert row["query"] not in row["positive"]  # docstring removed
        assert row["query_id"] == "q:" + row["positive_id"]


def test_first_sentence():
    assert first_sentence("Return the thing. More text.") == "Return the thing."
    assert first_sentence("Multi\n  line summary here.\n\nDetails.") == "Multi line summary here."
    assert first_sentence("No full stop") == "No full stop"


def _modules(ids):
    return {i.rsplit(".", 1)[0] for i in ids}


def test_pycode_is_deterministic_split_by_module_and_shaped_like_stdlib(tmp_path):
    """`negatron data pycode` on a few small installed packages (the full build parses torch,
    transformers and ray: its counts are in docs/data.md)."""
    import json

    from negatron.trainers.stdlib_data import build_pycode_dataset

    pkgs = ["yaml", "tqdm", "httpx", "click"]
    fracs = {"dev_frac": 0.2, "test_frac": 0.3}  # few modules: larger shares, so no split is empty
    counts = build_pycode_dataset(tmp_path / "a", packages=pkgs, **fracs)
    build_pycode_dataset(tmp_path / "b", packages=pkgs, **fracs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") and len(_digest(tmp_path / "a")) == 7
    info = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert set(info["packages"]) == {"PyYAML", "tqdm", "httpx", "click"} and info["counts"] == counts
    train = check_pairs(tmp_path / "a" / "train.parquet")
    assert train.schema.names == pq.read_schema(tmp_path / "a" / "train.parquet").names
    assert set(train.schema.names) == {"query", "positive", "query_id", "positive_id"}
    ids = {"train": set(train.column("positive_id").to_pylist())}
    for split in ("dev", "test"):
        ev = check_eval_dir(tmp_path / "a" / split)
        ids[split] = set(ev.corpus.column("doc_id").to_pylist())
    assert counts["train"]["pairs"] > 100
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not ids[a] & ids[b] and not _modules(ids[a]) & _modules(ids[b]), (a, b)
    assert all(i.split(".")[0] in pkgs for i in ids["train"])


def test_pycode_sources_do_not_depend_on_what_was_imported_first():
    """Ray puts vendored copies (ray/thirdparty_files) ahead of site-packages once imported; the
    packages and versions pycode reads are still those installed in site-packages."""
    import sysconfig
    from pathlib import Path

    import ray  # noqa: F401

    from negatron.trainers.stdlib_data import pycode_sources

    root, found, versions = pycode_sources()
    assert root == Path(sysconfig.get_paths()["purelib"]).resolve()
    assert {"numpy", "torch", "ray", "pyarrow"} <= set(found) and versions["numpy"]
    assert all((root / m / "__init__.py").is_file() for m in found)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negatron.trainers.schema import SchemaError, check_eval_dir, check_pairs
from tests.helpers import write_pairs


def _pairs(tmp_path, **cols):
    base = {"query": ["a b", "c d"], "positive": ["x", "y"], "query_id": ["q1", "q2"], "positive_id": ["d1", "d2"]}
    base.update(cols)
    base = {k: v for k, v in base.items() if v is not None}
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(base), p)
    return p


def test_good_pairs(tmp_path):
    t = check_pairs(write_pairs(tmp_path / "p.parquet", 10, with_negatives=True))
    assert t.num_rows == 10


@pytest.mark.parametrize("cols, fragment", [
    ({"positive": None}, "missing column(s) 'positive'"),
    ({"query": [1, 2]}, "column 'query' has type int64, expected string"),
    ({"positive_id": ["d1", None]}, "column 'positive_id' has 1 null value(s) (first at row 1)"),
    ({"query": ["a", ""]}, "column 'query' has 1 empty string(s)"),
    ({"negatives": ["x", "y"]}, "column 'negatives' has type string, expected list<string>"),
])
def test_pair_errors_name_file_and_column(tmp_path, cols, fragment):
    p = _pairs(tmp_path, **cols)
    with pytest.raises(SchemaError) as e:
        check_pairs(p)
    assert str(p) in str(e.value) and fragment in str(e.value)


def test_empty_and_not_parquet(tmp_path):
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "positive": pa.array([], pa.string()),
                             "query_id": pa.array([], pa.string()), "positive_id": pa.array([], pa.string())}), p)
    with pytest.raises(SchemaError, match="empty"):
        check_pairs(p)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(SchemaError, match="not a readable Parquet"):
        check_pairs(bad)
    with pytest.raises(SchemaError, match="file not found"):
        check_pairs(tmp_path / "missing.parquet")


def _eval_dir(tmp_path, corpus_ids=("d1", "d2"), qrel_docs=("d1",)):
    d = tmp_path / "ev"
    d.mkdir()
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["hello there"]}), d / "queries.parquet")
    pq.write_table(pa.table({"doc_id": list(corpus_ids), "text": ["x"] * len(corpus_ids)}), d / "corpus.parquet")
    pq.write_table(pa.table({"query_id": ["q1"] * len(qrel_docs), "doc_id": list(qrel_docs),
                             "score": [1] * len(qrel_docs)}), d / "qrels.parquet")
    return d


def test_eval_dir_checks(tmp_path):
    data = check_eval_dir(_eval_dir(tmp_path))
    assert data.relevant() == {"q1": {"d1": 1.0}}


def test_eval_dir_duplicate_id(tmp_path):
    d = _eval_dir(tmp_path, corpus_ids=("d1", "d1"))
    with pytest.raises(SchemaError) as e:
        check_eval_dir(d)
    assert "corpus.parquet" in str(e.value) and "'doc_id'" in str(e.value) and "duplicate" in str(e.value)


def test_eval_dir_unknown_qrel(tmp_path):
    d = _eval_dir(tmp_path, qrel_docs=("d9",))
    with pytest.raises(SchemaError, match="qrels.parquet: column 'doc_id' has 1 id"):
        check_eval_dir(d)


def test_eval_dir_missing(tmp_path):
    with pytest.raises(SchemaError, match="eval folder not found"):
        check_eval_dir(tmp_path / "nope")


def test_parquet_with_a_valid_footer_over_corrupt_pages_is_a_schema_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from negatron.trainers.schema import SchemaError, check_pairs

    n = 2000
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [f"q {i} " * 5 for i in range(n)], "positive": [f"p {i} " * 5 for i in range(n)],
                             "query_id": [f"q{i}" for i in range(n)], "positive_id": [f"d{i}" for i in range(n)]}),
                   path, compression="snappy")
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    for i in range(8, len(raw) - footer - 8, 7):  # scribble over the data pages, keep the footer
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    pq.read_schema(path)  # the footer still reads
    with pytest.raises(SchemaError, match="corrupt Parquet data"):
        check_pairs(path)

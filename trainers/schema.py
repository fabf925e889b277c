"""Schema checks for user Parquet, run on the driver before any work starts.

Every error names the file, the column and the problem, e.g.
``data/train.parquet: column 'positive_id': 3 null values (first at row 17)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from negatron.cluster import storage
from negatron.cluster.errors import NegatronError


class SchemaError(NegatronError, ValueError):
    """A user Parquet file does not have the expected columns or values."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "string" | "id" | "number" | "string_list" | "binary" | "integer"
    required: bool = True
    unique: bool = False


PAIRS = [
    Column("query", "string"),
    Column("positive", "string"),
    Column("query_id", "id"),
    Column("positive_id", "id"),
    Column("negatives", "string_list", required=False),
    Column("negative_ids", "string_list", required=False),
]
QUERIES = [Column("query_id", "id", unique=True), Column("text", "string")]
CORPUS = [Column("doc_id", "id", unique=True), Column("text", "string")]
QRELS = [Column("query_id", "id"), Column("doc_id", "id"), Column("score", "number")]
IMAGES = [Column("id", "id", unique=True), Column("image", "binary"), Column("label", "integer", required=False)]


def _read(path: str, columns: list[Column], data: bytes | None = None) -> pa.Table:
    """``path``: a local path or a URI (printed as ``redact(path)``)."""
    fs = None
    source: object = pa.BufferReader(data) if data is not None else path
    if data is None:
        if not storage.exists(path):
            raise SchemaError(f"{path}: file not found")
        if storage.is_dir(path):
            raise SchemaError(f"{path}: is a folder; give a Parquet file")
        fs, source = storage.filesystem(path)
    try:
        schema = pq.read_schema(source, filesystem=fs)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise SchemaError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    names = set(schema.names)
    require_columns(schema, columns, path)
    wanted = [c.name for c in columns if c.name in names]
    try:
        return pq.read_table(pa.BufferReader(data) if data is not None else source, columns=wanted, filesystem=fs)
    except Exception as e:  # a valid footer over corrupt pages: ArrowInvalid, OSError, ...
        raise SchemaError(f"{path}: corrupt Parquet data ({type(e).__name__}: {_first_line(e)})") from None


def require_columns(schema: pa.Schema, columns: list[Column], path: str) -> None:
    """Raise naming the file and every required column ``schema`` lacks."""
    missing = [c.name for c in columns if c.required and c.name not in schema.names]
    if missing:
        raise SchemaError(
            f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
            f"expected {', '.join(c.name for c in columns if c.required)} (found {', '.join(schema.names) or 'none'})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _type_ok(t: pa.DataType, kind: str) -> bool:
    if kind == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if kind == "id":
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
    if kind == "number":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if kind == "binary":
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if kind == "integer":
        return pa.types.is_integer(t)
    if kind == "string_list":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))
    raise AssertionError(kind)


_EXPECTED = {"string": "string", "id": "string or integer", "number": "integer or float",
             "string_list": "list<string>", "binary": "binary (PNG/JPEG bytes)", "integer": "integer"}


def check_table(path: str | Path, columns: list[Column], data: bytes | None = None) -> pa.Table:
    """Read ``path`` (or its bytes already read, ``data``) and validate it against ``columns``;
    return the table.

    Raises:
        SchemaError: naming the file, the column and the problem.
    """
    path = storage.redact(path) if storage.is_uri(path) else str(Path(path))
    table = _read(path, columns, data)
    if table.num_rows == 0:
        raise SchemaError(f"{path}: the table is empty (0 rows)")
    check_values(table, columns, path)
    return table


def check_values(table: pa.Table, columns: list[Column], path: str, row_offset: int = 0) -> None:
    """Types, nulls, empty texts and unique ids of ``table``, whose first row is row
    ``row_offset`` of ``path`` (a block of a larger file): errors name the file, column and row."""
    for col in columns:
        if col.name not in table.column_names:
            continue
        arr = table.column(col.name)
        if not _type_ok(arr.type, col.kind):
            raise SchemaError(
                f"{path}: column {col.name!r} has type {arr.type}, expected {_EXPECTED[col.kind]}")
        nulls = arr.null_count
        if nulls and col.kind != "string_list":
            first = pc.index(pc.is_null(arr), True).as_py() + row_offset
            raise SchemaError(f"{path}: column {col.name!r} has {nulls} null value(s) (first at row {first})")
        if col.kind == "string":
            empty = pc.sum(pc.equal(pc.utf8_length(arr), 0)).as_py() or 0
            if empty:
                first = pc.index(pc.equal(pc.utf8_length(arr), 0), True).as_py() + row_offset
                raise SchemaError(f"{path}: column {col.name!r} has {empty} empty string(s) (first at row {first})")
        if col.unique:
            n_unique = pc.count_distinct(arr).as_py()
            if n_unique != len(arr):
                counts = pc.value_counts(arr)
                dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
                raise SchemaError(
                    f"{path}: column {col.name!r} has {len(arr) - n_unique} duplicate id(s), e.g. {dup!r}")


def check_pairs(path: str | Path) -> pa.Table:
    """Validate a training pairs file (query, positive, query_id, positive_id [, negatives]),
    reading it whole (mining, tests; training streams it: ``open_pairs``)."""
    table = check_table(path, PAIRS)
    check_pair_lists(table, path)
    return table


def check_pair_lists(table: pa.Table, path: str | Path, row_offset: int = 0) -> None:
    # 'negative_ids' alone is what `negatron mine` writes: the texts are in data.negatives_corpus
    if "negative_ids" in table.column_names and "negatives" in table.column_names:
        a = pc.fill_null(pc.list_value_length(table.column("negatives")), 0)
        b = pc.fill_null(pc.list_value_length(table.column("negative_ids")), 0)
        differ = pc.not_equal(a, b)
        if pc.any(differ).as_py():
            first = pc.index(differ, True).as_py() + row_offset
            raise SchemaError(f"{path}: columns 'negatives' and 'negative_ids' have different lengths "
                              f"(first at row {first})")


def check_pair_block(table: pa.Table, block) -> None:
    """The per-row checks of one block of a streamed pairs table (run by each worker on what it
    reads); errors name the file and the row within it."""
    check_values(table, PAIRS, block.file, block.file_row)
    check_pair_lists(table, block.file, block.file_row)


def open_source(path: str | Path, columns: list[Column], what: str = "data"):
    """Open a Parquet file, folder or URI prefix without reading it: it exists, is Parquet, has
    ``columns`` with the right types and at least one row. Returns ``(ParquetSource, shown name)``.

    Raises:
        SchemaError: naming the file, the column and the problem.
    """
    from .ingest import ParquetSource

    shown = storage.redact(path) if storage.is_uri(path) else str(Path(path))
    if not storage.exists(path):
        raise SchemaError(f"{shown}: file not found")
    try:
        src = ParquetSource(str(path), columns=[c.name for c in columns])
    except storage.StorageError as e:
        raise SchemaError(f"{shown}: not a readable Parquet file or folder ({e})") from None
    require_columns(src.schema, columns, shown)
    for col in columns:
        if col.name in src.schema.names and not _type_ok(src.schema.field(col.name).type, col.kind):
            raise SchemaError(f"{shown}: column {col.name!r} has type {src.schema.field(col.name).type}, "
                              f"expected {_EXPECTED[col.kind]}")
    if src.num_rows == 0:
        raise SchemaError(f"{shown}: the {what} is empty (0 rows)")
    return src, shown


def open_pairs(path: str | Path):
    """The driver's check of a training pairs source (one Parquet file, a folder of them or a URI
    prefix) without reading it: schema and metadata, then every check on its first block; the
    workers check each block they read (``check_pair_block``). Returns the ``ParquetSource``.

    Raises:
        SchemaError: naming the file, the column and the problem.
    """
    src, shown = open_source(path, PAIRS, "table")
    src.columns = list(src.schema.names)  # the stream reads every column it knows
    try:
        check_pair_block(src.read(0), src.blocks[0])
    except storage.StorageError as e:
        raise SchemaError(f"{shown}: corrupt Parquet data ({e})") from None
    return src


def open_corpus(path: str | Path):
    """A corpus (``doc_id``, ``text``) of any size, checked like ``open_pairs``: metadata and the
    first block on the caller, every block where it is read (``check_values``). Returns the
    ``ParquetSource`` reading those two columns."""
    src, shown = open_source(path, CORPUS, "corpus")
    try:
        check_values(src.read(0), CORPUS, src.blocks[0].file, src.blocks[0].file_row)
    except storage.StorageError as e:
        raise SchemaError(f"{shown}: corrupt Parquet data ({e})") from None
    return src


def check_images(path: str | Path, labels: bool = False) -> pa.Table:
    """Validate an images file (id, image bytes [, label]); ``labels``: the label column is required."""
    table = check_table(path, IMAGES)
    if labels and "label" not in table.column_names:
        raise SchemaError(f"{path}: missing column 'label' (the k-NN and linear-probe metrics need labels)")
    return table


@dataclass
class EvalData:
    queries: pa.Table
    corpus: pa.Table
    qrels: pa.Table

    def relevant(self) -> dict[str, dict[str, float]]:
        """query_id -> {doc_id: score>0}"""
        out: dict[str, dict[str, float]] = {}
        for q, d, s in zip(*(self.qrels.column(c).to_pylist() for c in ("query_id", "doc_id", "score"))):
            if s > 0:
                out.setdefault(str(q), {})[str(d)] = float(s)
        return out


def check_eval_dir(folder: str | Path) -> EvalData:
    """Validate an eval folder holding queries.parquet, corpus.parquet and qrels.parquet.

    Beyond per-file checks, every qrels query_id/doc_id must exist in queries/corpus.
    """
    folder = str(folder)
    if not storage.is_dir(folder):
        raise SchemaError(f"{storage.redact(folder)}: eval folder not found "
                          "(expected queries.parquet, corpus.parquet, qrels.parquet)")
    queries = check_table(storage.join(folder, "queries.parquet"), QUERIES)
    corpus = check_table(storage.join(folder, "corpus.parquet"), CORPUS)
    qrels = check_table(storage.join(folder, "qrels.parquet"), QRELS)
    qids = set(map(str, queries.column("query_id").to_pylist()))
    dids = set(map(str, corpus.column("doc_id").to_pylist()))
    for col, known, other in (("query_id", qids, "queries.parquet"), ("doc_id", dids, "corpus.parquet")):
        unknown = [v for v in map(str, qrels.column(col).to_pylist()) if v not in known]
        if unknown:
            raise SchemaError(
                f"{storage.redact(storage.join(folder, 'qrels.parquet'))}: column {col!r} has {len(unknown)} id(s) not in {other}, e.g. {unknown[0]!r}")
    return EvalData(queries, corpus, qrels)

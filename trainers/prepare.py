"""``negatron data prepare``: rewrite pairs (JSONL, CSV or Parquet; local or URIs) into Parquet
shards that stream well — the expected columns, row groups of a bounded size, files of a bounded
size — reading and writing a batch at a time (memory stays flat whatever the input size).

Missing ``query_id`` / ``positive_id`` columns are derived from the texts (equal texts, equal
ids), so a plain (query, positive) file trains with correct duplicate masking. Every batch is
checked as it passes (empty texts, nulls), and an error names the input file and row.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from negatron.cluster import storage

from .ingest import hash_ids
from .schema import PAIRS, SchemaError, check_pair_lists, check_values

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json",
           ".csv": "csv"}


def _format(path: str) -> str:
    base = path.split("?", 1)[0].lower()
    for ext, kind in FORMATS.items():
        if base.endswith(ext):
            return kind
    raise SchemaError(f"{storage.redact(path)}: unknown format (give .parquet, .jsonl/.json or .csv files)")


def _batches(path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    kind = _format(path)
    fs, inner = storage.filesystem(path)
    try:
        if kind == "parquet":
            yield from pq.ParquetFile(fs.open_input_file(inner)).iter_batches(batch_size=batch_rows)
            return
        stream = fs.open_input_stream(inner)
        if kind == "json":
            import pyarrow.json as pj

            reader = pj.open_json(stream, read_options=pj.ReadOptions(block_size=1 << 24))
        else:
            import pyarrow.csv as pc_csv

            reader = pc_csv.open_csv(stream, read_options=pc_csv.ReadOptions(block_size=1 << 24))
        for batch in reader:
            yield batch
    except (SchemaError, storage.StorageError):
        raise
    except Exception as e:  # ArrowInvalid on a malformed line, OSError from the store
        raise SchemaError(f"{storage.redact(path)}: cannot read it as {kind} ({str(e).splitlines()[0][:300]})") from None


def _normalise(batch: pa.RecordBatch, path: str, first_row: int) -> pa.Table:
    t = pa.Table.from_batches([batch])
    names = set(t.column_names)
    for need in ("query", "positive"):
        if need not in names:
            raise SchemaError(f"{storage.redact(path)}: missing column {need!r} (found {', '.join(t.column_names)})")
    cols = {"query": pc.cast(t.column("query"), pa.string()), "positive": pc.cast(t.column("positive"), pa.string())}
    for id_col, text_col in (("query_id", "query"), ("positive_id", "positive")):
        if id_col in names:
            cols[id_col] = t.column(id_col)
        else:  # equal texts, equal ids
            cols[id_col] = pa.array(hash_ids(cols[text_col]).astype(str).tolist() if len(t) else [], pa.string())
    for extra in ("negatives", "negative_ids"):
        if extra in names:
            cols[extra] = t.column(extra)
    out = pa.table(cols)
    check_values(out, PAIRS, storage.redact(path), first_row)
    check_pair_lists(out, storage.redact(path), first_row)
    return out


def prepare(inputs: list[str], out: str, rows_per_file: int = 1_000_000, row_group_rows: int = 8192,
            log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Rewrite ``inputs`` into ``out/part-00000.parquet``, ... Returns counts and timing."""
    if rows_per_file < 1 or row_group_rows < 1:
        raise SchemaError("data prepare: --rows-per-file and --row-group-rows must be >= 1")
    for p in inputs:
        _format(p)
        if not storage.exists(p):
            raise SchemaError(f"{storage.redact(p)}: file not found")
    from tqdm import tqdm

    t0 = time.perf_counter()
    files: list[str] = []
    buffered: list[pa.Table] = []
    held = 0
    schema = None
    total = 0

    def flush(final: bool) -> None:
        nonlocal buffered, held
        while held >= rows_per_file or (final and held):
            table = pa.concat_tables(buffered)
            part, rest = table.slice(0, rows_per_file), table.slice(rows_per_file)
            target = storage.join(out, f"part-{len(files):05d}.parquet")
            storage.write_with(target, lambda tmp: pq.write_table(part, tmp, row_group_size=row_group_rows,
                                                                  compression="zstd"))
            files.append(target)
            buffered, held = ([rest] if rest.num_rows else []), rest.num_rows

    bar = tqdm(total=None, unit=" pairs", disable=not progress, desc="prepare", mininterval=1.0)
    for path in inputs:
        row = 0
        for batch in _batches(path, row_group_rows):
            table = _normalise(batch, path, row)
            if schema is None:
                schema = table.schema
            elif table.schema != schema:
                try:
                    table = table.cast(schema)
                except (pa.ArrowInvalid, ValueError):
                    raise SchemaError(f"{storage.redact(path)}: columns differ from the first input's "
                                      f"({table.schema} vs {schema})") from None
            row += table.num_rows
            total += table.num_rows
            buffered.append(table)
            held += table.num_rows
            bar.update(table.num_rows)
            flush(final=False)
    flush(final=True)
    bar.close()
    if not total:
        raise SchemaError("data prepare: the inputs hold no rows")
    wall = time.perf_counter() - t0
    log(f"wrote {total} pairs in {len(files)} file(s) under {storage.redact(out)} "
        f"(row groups of {row_group_rows}) in {wall:.1f}s")
    return {"rows": total, "files": [storage.redact(f) for f in files], "wall_s": round(wall, 2)}

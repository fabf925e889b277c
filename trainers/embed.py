"""The embedding pipeline: a corpus of any size embedded by a pool of Ray actors, written as
Parquet shards of ``(doc_id, row, embedding)`` plus a manifest.

**Plan.** The corpus (a Parquet file, folder or URI prefix with ``doc_id``, ``text``) is cut into
shards of at most ``shard_rows`` consecutive rows, each inside one row group, from its metadata
alone. ``plan.json`` records the plan and its key (model content hash, corpus fingerprint, token
limit, shard size).

**Run.** Ray Data feeds the shards that have no file yet to ``map_batches`` over an actor pool
(``ActorPoolStrategy``; CPUs or GPUs per actor): each actor loads the model once, reads its
shard's rows, embeds them in token-count-sorted forward passes (``Encoder.encode``) and writes
``shards/part-NNNNN.parquet`` (one PUT or temp file + rename). The driver sees only one small
record per shard, so its memory does not grow with the corpus; it shows docs/s.

**Resume.** A finished shard is a file: running the same command again embeds only the shards
that are missing. Another model, corpus or setting in the same folder is refused.

**Manifest.** ``manifest.json``, written last: model (path, content id), corpus (path,
fingerprint, rows), dimension, count, whether rows are unit-length, and the shard list (each
with its rows' place in the corpus, so texts can be read back by row).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from negatron.cluster import storage
from negatron.cluster.config import ConfigError

EMBED_VERSION = 1
PLAN, MANIFEST, SHARDS = "plan.json", "manifest.json", "shards"


def shard_file(i: int) -> str:
    return f"{SHARDS}/part-{i:05d}.parquet"


def plan_shards(source, shard_rows: int) -> list[dict[str, int]]:
    """Shards of at most ``shard_rows`` consecutive rows, none crossing a block (row group)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    shards = []
    for bi, b in enumerate(source.blocks):
        for off in range(0, b.rows, shard_rows):
            n = min(shard_rows, b.rows - off)
            shards.append({"id": len(shards), "block": bi, "offset": off, "rows": n, "start": b.start + off})
    return shards


def corpus_fingerprint(source) -> str:
    """A hash of the corpus's files as their metadata describe them: names, sizes in rows and bytes,
    and each row group's column statistics. Cheap (no data read) and changed by any rewrite."""
    h = hashlib.sha256()
    for frag in getattr(source, "fragments", []):
        md = frag.metadata
        h.update(frag.path.encode() + b"\0")
        h.update(json.dumps([md.num_rows, md.num_row_groups, md.serialized_size]).encode())
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            h.update(json.dumps([rg.num_rows, rg.total_byte_size]).encode())
            for c in range(rg.num_columns):
                st = rg.column(c).statistics
                if st is not None and st.has_min_max:
                    h.update(repr((st.min, st.max, st.null_count)).encode())
    return h.hexdigest()[:20]


def read_shard(source, shard: dict[str, int]) -> pa.Table:
    """The corpus rows of one shard (``doc_id``, ``text``)."""
    table = source.read(int(shard["block"]))
    return table.slice(int(shard["offset"]), int(shard["rows"]))


def shard_table(doc_ids: pa.Array | pa.ChunkedArray, start: int, emb: np.ndarray) -> pa.Table:
    """One shard's file: ``doc_id`` (string), ``row`` (the corpus row), ``embedding`` (fixed-size list)."""
    n, d = emb.shape
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return pa.table({"doc_id": pc.cast(doc_ids, pa.string()),
                     "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, d)})


def shard_vectors(table: pa.Table) -> np.ndarray:
    """N×D float32 view of a shard's ``embedding`` column."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, d)


class ShardEmbedder:
    """Ray Data actor: loads the model once, then embeds whole shards and writes their files."""

    def __init__(self, model: str, corpus: str, out: str, max_length: int, batch_size: int, threads: int,
                 use_gpu: bool = False, role: str = "document"):
        import torch

        from negatron.trainers.encoder import Encoder
        from negatron.trainers.ingest import ParquetSource
        from negatron.trainers.model_io import resolve_model_path

        torch.set_num_threads(max(1, threads))
        self.enc = Encoder.from_pretrained(str(resolve_model_path(model)))  # a URI is fetched once per node
        if use_gpu:
            self.enc.to("cuda")
        self.enc.eval()
        self.source = ParquetSource(corpus, columns=["doc_id", "text"])
        self.out, self.max_length, self.batch_size = out, max_length or self.enc.max_length, batch_size
        self.role = role

    def embed(self, shard: dict[str, int]) -> tuple[int, float, float]:
        from .schema import CORPUS, check_values

        table = read_shard(self.source, shard)
        block = self.source.blocks[int(shard["block"])]
        check_values(table, CORPUS, block.file, block.file_row + int(shard["offset"]))
        started = time.time()  # wall clock: the driver compares shards from every actor
        emb = self.enc.encode(table.column("text").to_pylist(), self.batch_size, self.max_length, role=self.role)  # n×D
        out = shard_table(table.column("doc_id"), int(shard["start"]), emb)
        storage.write_with(storage.join(self.out, shard_file(int(shard["id"]))), lambda p: pq.write_table(out, p))
        return int(emb.shape[1]), started, time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("id", "block", "offset", "rows", "start")
        dims, starts, ends = [], [], []
        for i in range(len(batch["id"])):
            d, s, e = self.embed({k: int(batch[k][i]) for k in keys})
            dims.append(d)
            starts.append(s)
            ends.append(e)
        return {"id": batch["id"], "rows": batch["rows"], "dim": np.array(dims), "started": np.array(starts),
                "ended": np.array(ends)}


def _plan_key(model_hash: str, fingerprint: str, max_length: int, shard_rows: int, role: str = "document") -> str:
    parts = [EMBED_VERSION, model_hash, fingerprint, max_length, shard_rows] + ([role] if role != "document" else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file on disk or on a store, opened for its metadata or row groups."""
    fs, inner = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


def done_shards(out: str, plan: list[dict]) -> dict[int, int]:
    """Shard id -> dimension, for every shard whose file exists with its planned number of rows."""
    folder = storage.join(out, SHARDS)
    if not storage.is_dir(folder):
        return {}
    present = {storage.name(p) for p, _, _ in storage.list_files(folder)}
    done = {}
    for s in plan:
        if storage.name(shard_file(s["id"])) not in present:
            continue
        try:
            pf = open_parquet(storage.join(out, shard_file(s["id"])))
            if pf.metadata.num_rows == s["rows"]:
                done[s["id"]] = int(pf.schema_arrow.field("embedding").type.list_size)
        except Exception:  # noqa: BLE001 - an unreadable shard is embedded again
            pass
    return done


def embed_corpus(model: str, data: str, out: str, actors: int = 2, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0, batch_size: int = 64, max_length: int = 0, shard_rows: int = 4096,
                 log: Callable[[str], None] = print, address: str | None = None,
                 role: str = "document") -> dict[str, Any]:
    """Embed the corpus ``data`` into ``out`` (a folder or URI); returns the manifest.

    ``role``: the model's prompt the texts get ("document", or "query" when mining embeds queries).

    Raises:
        SchemaError: the corpus is missing, unreadable or lacks ``doc_id`` / ``text``.
        ConfigError: bad settings, or ``out`` holds another model's or corpus's embeddings.
    """
    from .model_io import ModelLoadError, model_id, resolve_model_path
    from .schema import open_corpus

    if actors < 1 or batch_size < 1 or shard_rows < 1 or cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise ConfigError("embed: need --actors, --batch-size, --shard-rows >= 1, --cpus-per-actor > 0 and "
                          f"--gpus-per-actor >= 0 (got {actors}, {batch_size}, {shard_rows}, {cpus_per_actor}, {gpus_per_actor})")
    source = open_corpus(data)
    try:
        folder = resolve_model_path(model)
    except ModelLoadError as e:
        raise ConfigError(f"embed: --model: {e}") from None
    from .model_io import IMAGE_CONFIG

    if (folder / IMAGE_CONFIG).is_file():
        raise ConfigError(f"embed: {model} is an image encoder; the pipeline embeds text corpora")
    st = _model_settings(folder)
    max_len = max_length or st["max_length"]
    plan = plan_shards(source, shard_rows)
    mid, fp = model_id(folder), corpus_fingerprint(source)
    key = _plan_key(mid, fp, max_len, shard_rows, role)
    plan_doc = {"version": EMBED_VERSION, "key": key, "model": {"path": storage.redact(model), "id": mid},
                "corpus": {"path": storage.redact(data), "fingerprint": fp, "rows": source.num_rows,
                           "files": [f.path for f in source.fragments]},
                "max_length": max_len, "shard_rows": shard_rows,
                "shards": [{**s, "file": shard_file(s["id"]), "row_group": source.blocks[s["block"]].row_group,
                            "fragment": source.blocks[s["block"]].fragment} for s in plan]}
    plan_path = storage.join(out, PLAN)
    if storage.is_file(plan_path):
        old = storage.read_json(plan_path)
        if old.get("key") != key:
            raise ConfigError(f"embed: {storage.redact(out)} holds embeddings of another model, corpus or setting "
                              f"(model {old.get('model', {}).get('id')} vs {mid}, corpus {old.get('corpus', {}).get('fingerprint')} "
                              f"vs {fp}); give a new --out folder or remove it")
    elif storage.is_dir(out) and storage.list_files(out, limit=1):
        raise ConfigError(f"embed: --out {storage.redact(out)} is a non-empty folder that holds no embeddings; give a new folder")
    else:
        storage.check_writable(out)
        storage.write_json(plan_path, plan_doc)
    done = done_shards(out, plan)
    todo = [s for s in plan if s["id"] not in done]
    log(f"embed: {source.num_rows} docs in {len(plan)} shards ({len(done)} already done) with {min(actors, max(1, len(todo)))} actor(s), "
        f"model {storage.redact(model)} ({mid}), max_length {max_len}")
    t0 = time.perf_counter()
    dim, busy, span = next(iter(done.values()), None), 0.0, 0.0
    if todo:
        ran, busy, span = _run(model, data, out, todo, actors, cpus_per_actor, gpus_per_actor, batch_size, max_len, address,
                               role)
        dim = ran or dim
    wall = time.perf_counter() - t0
    embedded = sum(s["rows"] for s in todo)
    manifest = {**plan_doc, "dim": dim, "count": source.num_rows, "normalized": st["normalize"],
                "embedded_now": embedded, "wall_s": round(wall, 2),
                "docs_per_s": round(embedded / wall, 2) if embedded and wall > 0 else None,
                # from the first shard's start to the last shard's end: Ray Data's and the actors'
                # start-up (model loading) excluded, which a large corpus amortises
                "docs_per_s_embedding": round(embedded / span, 2) if embedded and span > 0 else None,
                # the actors' own rate (embedding time only, summed over actors)
                "docs_per_actor_s": round(embedded / busy, 2) if embedded and busy > 0 else None,
                "actors": actors, "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def embed_local(embed: Callable[[list[str]], np.ndarray], data: str, out: str, model: dict,
                shard_rows: int = 4096, max_length: int = 0) -> dict[str, Any]:
    """The pipeline's output format written in this process by ``embed(texts) -> N×D`` (tests and
    callers that already hold an encoder); ``model`` is the manifest's model record."""
    from .schema import open_corpus

    source = open_corpus(data)
    plan = plan_shards(source, shard_rows)
    dim = None
    for s in plan:
        table = read_shard(source, s)
        emb = np.asarray(embed(table.column("text").to_pylist()), dtype=np.float32)  # n×D
        dim = int(emb.shape[1])
        out_t = shard_table(table.column("doc_id"), s["start"], emb)
        storage.write_with(storage.join(out, shard_file(s["id"])), lambda p: pq.write_table(out_t, p))
    manifest = {"version": EMBED_VERSION, "model": model, "max_length": max_length, "shard_rows": shard_rows,
                "corpus": {"path": storage.redact(data), "fingerprint": corpus_fingerprint(source),
                           "rows": source.num_rows, "files": [f.path for f in getattr(source, "fragments", [])]},
                "shards": [{**s, "file": shard_file(s["id"])} for s in plan], "dim": dim, "count": source.num_rows,
                "normalized": True, "embedded_now": source.num_rows}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def _model_settings(folder) -> dict:
    from .model_io import read_st_settings

    st = read_st_settings(folder)
    return {"max_length": int(st.get("max_length") or 128), "normalize": bool(st.get("normalize", True))}



def _run(model: str, data: str, out: str, todo: list[dict], actors: int, cpus: float, gpus: float, batch_size: int,
         max_len: int, address: str | None, role: str = "document") -> tuple[int | None, float, float]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm.auto import tqdm

    from negatron.cluster.local import ensure_ray

    ensure_ray(address)
    from negatron.cluster import console

    console.quiet_logger("ray.data")  # its per-dataset INFO lines go to the log file, not the terminal
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar below, in docs
    ctx.print_on_execution_start = False
    items = [{k: s[k] for k in ("id", "block", "offset", "rows", "start")} for s in todo]
    # one shard per block (up to 4096 blocks): actors take shards one at a time, so none idles
    # while another works through a long block, and the bar moves as shards finish
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))
    embedded = ds.map_batches(
        ShardEmbedder, batch_size=1, compute=ActorPoolStrategy(size=min(actors, len(items))), num_cpus=cpus, num_gpus=gpus or None,
        fn_constructor_kwargs={"model": model, "corpus": data, "out": out, "max_length": max_len,
                               "batch_size": batch_size, "threads": max(1, int(cpus)), "use_gpu": gpus > 0,
                               "role": role})
    total = sum(s["rows"] for s in todo)
    bar = tqdm(total=total, desc="embed", unit="doc", mininterval=2.0, file=sys.stdout, smoothing=0.1)
    dim, busy, first, last = None, 0.0, float("inf"), 0.0
    for row in embedded.iter_rows():
        bar.update(int(row["rows"]))
        dim, busy = int(row["dim"]), busy + float(row["ended"]) - float(row["started"])
        first, last = min(first, float(row["started"])), max(last, float(row["ended"]))
    bar.close()
    return dim, busy, (last - first if last else 0.0)

"""The embedding pipeline and index artifacts at scale, measured; prints JSON.

    python bench/embed_index.py [--docs 4000] [--vectors 1000000] [--skip-serve] [--out FILE]

1. **Embedding throughput**: ``negatron embed --model default`` over ``--docs`` real documents
   (windows of the standard library's source, as in ``bench/serve_load.py``) with 1 actor and with
   2 actors (1 CPU and 1 torch thread each), each in its own process: docs/s from the first shard's
   start to the last shard's end (``ratio_2_vs_1``: the pool's start-up — Ray Data, actors, model
   loading, ~25 s here — excluded, as a large corpus amortises it), docs/s over the whole call
   (``ratio_2_vs_1_wall``), the actors' own rate, the driver's peak RSS, and whether both runs
   wrote the same embeddings.
2. **IVF-PQ over ``--vectors`` vectors**: synthetic clustered unit vectors of MiniLM's dimension
   (384; 2,000 random unit cluster centres, plus a within-cluster spread of 0.1 per dimension in
   one shared 48-dimensional subspace, plus 0.02 isotropic noise, then normalised — real embeddings have low intrinsic dimension; isotropic noise would make every
   neighbour equidistant) written in ``negatron embed``'s shard format, with a corpus of short
   synthetic texts. The manifest names the packaged model, so the server accepts it: the
   *vectors* are synthetic, the query embedding at serve time is real. ``negatron index build
   --kind ivfpq`` runs in its own process: index size against exact flat, recall@10 against
   exact search on 1,000 held-out vectors, build time, the process's peak RSS.
3. **/search over that index**: ``negatron serve --model default --index DIR`` and 8 closed-loop
   clients for 20 s (real stdlib docstrings as queries, top_k 10): requests/s, p50/p99, and the
   Retriever replica's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def run_measured(args: list[str], env: dict | None = None) -> dict:
    """Run ``negatron ARGS`` as a child; its own peak RSS (polled every 50 ms), wall time, output."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "negatron.cluster.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    peak = 0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    reader.join(30)
    text = "".join(out)
    if proc.returncode != 0:
        raise RuntimeError(f"negatron {' '.join(args)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"peak_rss_mb": round(peak / 2**20), "wall_s": round(time.perf_counter() - t0, 1), "output": text}


def emit(result: dict, out: str | None) -> dict:
    """Print the JSON, and write it to ``out`` when given."""
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def throughput(work: Path, docs: int) -> dict:
    from serve_load import stdlib_windows

    from negatron.trainers.embed import shard_vectors

    ids, texts = stdlib_windows(docs)
    corpus = work / "stdlib_corpus.parquet"
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), corpus, row_group_size=1024)
    runs = {}
    for actors in (1, 2):
        out = work / f"emb_{actors}"
        r = run_measured(["embed", "--model", "default", "--data", str(corpus), "--out", str(out),
                          "--actors", str(actors), "--cpus-per-actor", "1", "--shard-rows", "256",
                          "--max-length", "128"])
        m = json.loads((out / "manifest.json").read_text())
        t = pq.read_table(out / "shards").sort_by("row")
        runs[actors] = {"docs": m["count"], "wall_s": m["wall_s"], "docs_per_s": m["docs_per_s"],
                        "docs_per_s_embedding": m["docs_per_s_embedding"],
                        "docs_per_actor_s": m["docs_per_actor_s"], "driver_peak_rss_mb": r["peak_rss_mb"],
                        "process_wall_s": r["wall_s"], "_vectors": shard_vectors(t)}
    same = float(np.abs(runs[1].pop("_vectors") - runs[2].pop("_vectors")).max())
    return {"docs": len(ids), "one_actor": runs[1], "two_actors": runs[2],
            "ratio_2_vs_1": round(runs[2]["docs_per_s_embedding"] / runs[1]["docs_per_s_embedding"], 2),
            "ratio_2_vs_1_wall": round(runs[2]["docs_per_s"] / runs[1]["docs_per_s"], 2),
            "max_abs_diff_1_vs_2_actors": same}


def synthetic(work: Path, n: int, d: int = 384, shard_rows: int = 4096, seed: int = 0) -> Path:
    """``negatron embed``-format shards of clustered unit vectors and their corpus."""
    from negatron.trainers.embed import MANIFEST, shard_file, shard_table
    from negatron.trainers.model_io import model_id, read_st_settings, resolve_model_path

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2000, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.normal(size=(d, 48)))[0].astype(np.float32)  # d×48, orthonormal
    out = work / "synthetic_emb"
    (out / "shards").mkdir(parents=True, exist_ok=True)
    corpus = work / "synthetic_corpus.parquet"
    shards = []
    with pq.ParquetWriter(corpus, pa.schema([("doc_id", pa.string()), ("text", pa.string())])) as writer:
        for i, start in enumerate(range(0, n, shard_rows)):
            rows = min(shard_rows, n - start)
            c = rng.integers(0, len(centers), rows)
            v = centers[c] + 0.1 * rng.normal(size=(rows, 48)).astype(np.float32) @ basis.T \
                + 0.02 * rng.normal(size=(rows, d)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            ids = np.array([f"s{j}" for j in range(start, start + rows)])
            pq.write_table(shard_table(pa.array(ids), start, v), out / shard_file(i))
            writer.write_table(pa.table({"doc_id": ids, "text": [f"synthetic document {j} of cluster {k}"
                                                                 for j, k in zip(range(start, start + rows), c)]}))
            shards.append({"id": i, "block": i, "offset": 0, "rows": rows, "start": start, "file": shard_file(i)})
    folder = resolve_model_path("default")
    manifest = {"version": 1, "synthetic": True, "model": {"path": "default", "id": model_id(folder)},
                "corpus": {"path": str(corpus), "files": [str(corpus)], "rows": n, "fingerprint": "synthetic"},
                "max_length": int(read_st_settings(folder).get("max_length") or 128), "dim": d, "count": n,
                "normalized": True, "shard_rows": shard_rows, "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def search_latency(index: Path, seconds: float = 20.0) -> dict:
    import psutil
    from loadgen import ServeProcess, free_port, replica_pids
    from serve_load import load

    from negatron.trainers.stdlib_data import build_stdlib_dataset

    with tempfile.TemporaryDirectory() as tmp:
        build_stdlib_dataset(Path(tmp) / "d")
        queries = pq.read_table(Path(tmp) / "d" / "test" / "queries.parquet").column("text").to_pylist()
    port = free_port()
    with ServeProcess(["--model", "default", "--index", str(index), "--port", str(port),
                       "serve.retriever.scale.num_cpus=1", "serve.limits.max_top_k=100"], cwd=ROOT) as srv:
        url = srv.wait_ready(600)
        bodies = [{"query": q, "top_k": 10} for q in queries]
        res = asyncio.run(load(url, "/search", bodies, 8, seconds))
        rss = [psutil.Process(p).memory_info().rss for p in replica_pids("negatron", "Retriever")]
        res["retriever_rss_mb"] = round(max(rss) / 2**20) if rss else None
        srv.stop()
    res["requests_per_s"] = res.pop("texts_per_s")
    return res


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000, help="real documents for the throughput part")
    ap.add_argument("--vectors", type=int, default=1_000_000, help="synthetic vectors for the IVF-PQ part")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--only-embed", action="store_true",
                    help="rerun the throughput part only, replacing it in the --out JSON (which must exist)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = tempfile.TemporaryDirectory(prefix="negatron-embed-index-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    if args.only_embed:
        result = json.loads(Path(args.out).read_text())
        result["embed"] = throughput(work, args.docs)
        return emit(result, args.out)
    result["embed"] = throughput(work, args.docs)
    t0 = time.perf_counter()
    emb = synthetic(work, args.vectors)
    gen_s = time.perf_counter() - t0
    r = run_measured(["index", "build", "--embeddings", str(emb), "--kind", "ivfpq", "--out", str(work / "ivfpq")],
                     env={"OMP_NUM_THREADS": str(os.cpu_count())})
    meta = json.loads((work / "ivfpq" / "index.json").read_text())
    result["ivfpq"] = {"vectors": meta["count"], "dim": meta["dim"], "params": meta["params"],
                       "index_bytes": meta["index_bytes"], "flat_bytes": meta["flat_bytes"],
                       "vectors_on_disk_bytes": meta["vectors_on_disk_bytes"],
                       "size_vs_flat": round(meta["index_bytes"] / meta["flat_bytes"], 4),
                       "recall_at_10": meta["recall_at_10"], "recall_queries": meta["recall_queries"],
                       "trained_on": meta["trained_on"], "build_s": meta["build_s"],
                       "build_process_peak_rss_mb": r["peak_rss_mb"], "synthetic_generation_s": round(gen_s, 1)}
    if not args.skip_serve:
        result["search_c8"] = search_latency(work / "ivfpq")
    if tmp is not None:
        tmp.cleanup()
    return emit(result, args.out)


if __name__ == "__main__":
    main()

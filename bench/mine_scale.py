"""Mining at scale, measured: the driver's peak RSS and the mined file's size; prints JSON.

    python bench/mine_scale.py [--pairs 100000] [--out FILE]

``--pairs`` real pairs from the standard library's source (each a 12-line window as the positive,
its first line as the query, so 100k pairs give 100k distinct candidates) are mined with
``negatron mine --take 30`` in its own process, the driver's RSS polled every 50 ms (Ray's workers
and actors are other processes). What is measured does not depend on the encoder's quality, and
MiniLM embeds ~20 docs/s per CPU core here (200k texts: ~1.5 h), so the encoder is a 2-layer,
64-wide BERT with the packaged tokenizer, built from a config (random weights) — the memory and
file sizes are those of the pipeline, the speed is not MiniLM's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> dict:
    from embed_index import emit, run_measured
    from serve_load import stdlib_windows

    from tests.helpers import make_tiny_encoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="negatron-mine-scale-") as tmp:
        work = Path(tmp)
        ids, texts = stdlib_windows(args.pairs)
        queries = [t.splitlines()[0][:200] for t in texts]
        pq.write_table(pa.table({"query": queries, "positive": texts, "query_id": [f"q{i}" for i in range(len(ids))],
                                 "positive_id": ids}), work / "pairs.parquet", row_group_size=8192)
        make_tiny_encoder(seed=0, hidden=64, layers=2).save(work / "model")
        t0 = time.perf_counter()
        r = run_measured(["mine", "--model", str(work / "model"), "--data", str(work / "pairs.parquet"),
                          "--out", str(work / "mined.parquet"), "--k", "40", "--skip", "3", "--take", "30",
                          "--max-length", "128", "--workers", "2", "--batch-size", "64"])
        mined = pq.read_table(work / "mined.parquet")
        lengths = [len(x) for x in mined.column("negative_ids").to_pylist()]
        result = {
            "pairs": len(ids), "candidates": len(set(ids)),
            "driver_peak_rss_mb": r["peak_rss_mb"], "wall_s": round(time.perf_counter() - t0, 1),
            "input_bytes": (work / "pairs.parquet").stat().st_size,
            "mined_bytes": (work / "mined.parquet").stat().st_size,
            "negatives_corpus_bytes": (work / "mined.negatives.parquet").stat().st_size,
            "negatives_per_pair_mean": round(sum(lengths) / len(lengths), 2),
            "encoder": "BERT 2 layers x 64 (random weights, packaged tokenizer)",
        }
        result["mined_vs_input"] = round(result["mined_bytes"] / result["input_bytes"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()

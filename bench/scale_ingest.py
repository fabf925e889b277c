"""Ingest at scale: peak RSS per training worker and the rate batches are delivered, by table size.

Synthetic pairs with realistic text lengths (queries of 6-16 words, positives of 60-160 words
drawn from a 30k-word vocabulary, ~700 bytes a pair) are generated on the fly (vectorised in
Arrow) and written as Parquet with 8192-row row groups — the layout ``negatron data prepare``
writes. For each size, 2 worker processes (rank 0 and 1 of 2) run the training ingest path —
``PairStream`` over a ``ParquetSource`` with the per-block checks, exactly what
``Task.stream`` builds in a Ray Train worker — for 1600 steps at a per-worker batch of 64 (204,800
pairs: through at least three 65,536-row shuffle windows, or two epochs of the 100k table), then report their peak RSS (``VmHWM``) and batches/s and pairs/s of the ingest alone.

``--before`` runs the code of an earlier commit the same way (``pq.read_table`` of the whole
file and its in-memory ``PairStream``), as the "before" row.

The training rate it is compared with is all-MiniLM-L6-v2 (the packaged model) training on the
same batches here: forward + backward of query and positive at max_length 128, measured over a
few steps in this process (``--skip-model`` leaves it out).

    python bench/scale_ingest.py --sizes 100000,1000000,5000000 --out docs/scale_ingest_result.json
    python bench/scale_ingest.py --sizes 100000,1000000 --before 6788923 --out /tmp/before.json

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BATCH, WORLD = 64, 2
STEPS = int(os.environ.get("NEGATRON_SCALE_STEPS", "1600"))  # 1600 × 128 pairs: past three shuffle windows


def _words(n: int, rng: np.random.Generator) -> pa.Array:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lengths = rng.integers(2, 11, n)
    chars = letters[rng.integers(0, 26, int(lengths.sum()))]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def _texts(n: int, lo: int, hi: int, vocab: pa.Array, rng: np.random.Generator) -> pa.Array:
    counts = rng.integers(lo, hi + 1, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    words = vocab.take(pa.array(rng.integers(0, len(vocab), int(offsets[-1]))))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")


def write_pairs(path: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> dict:
    """``rows`` synthetic pairs in 8192-row row groups; returns size facts."""
    rng = np.random.default_rng(seed)
    vocab = _words(30_000, rng)
    t0 = time.perf_counter()
    writer = None
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        ids = np.arange(lo, lo + n)
        table = pa.table({
            "query": _texts(n, 6, 16, vocab, rng), "positive": _texts(n, 60, 160, vocab, rng),
            "query_id": pa.array([f"q{i}" for i in ids]), "positive_id": pa.array([f"d{i}" for i in ids]),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=8192)
    writer.close()
    meta = pq.ParquetFile(path).metadata
    return {"rows": rows, "file_mb": round(path.stat().st_size / 2**20, 1), "row_groups": meta.num_row_groups,
            "raw_mb": round(sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / 2**20, 1),
            "write_s": round(time.perf_counter() - t0, 1)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: on Linux that keeps the
    peak of the parent a spawned process was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _worker(path: str, rank: int, before_module: str | None, shuffle_rows: int, out: mp.Queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # what a training worker has loaded anyway: part of the baseline

    torch.set_num_threads(1)
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if before_module:
        import importlib

        mod = importlib.import_module(before_module)
        stream = mod.PairStream(pq.read_table(path), BATCH, rank, WORLD, seed=0, num_negatives=1)
    else:
        from negatron.trainers.data import PairStream
        from negatron.trainers.ingest import ParquetSource
        from negatron.trainers.schema import check_pair_block

        stream = PairStream(ParquetSource(path), BATCH, rank, WORLD, seed=0, num_negatives=1, check=check_pair_block,
                            shuffle_rows=shuffle_rows)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(STEPS):
        stream.global_rows(step)  # the loop's data digest
        b = stream.batch(step)
        assert len(b["query"]) == BATCH
    wall = time.perf_counter() - t1
    out.put({"rank": rank, "setup_s": round(setup, 2), "steps": STEPS, "ingest_s": round(wall, 3),
             "batches_per_s": round(STEPS / wall, 1), "pairs_per_s": round(STEPS * BATCH / wall, 1),
             "baseline_rss_mb": base, "peak_rss_mb": _peak_rss_mb()})


def run_size(path: Path, before_module: str | None, shuffle_rows: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(path), r, before_module, shuffle_rows, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = []
    for p in procs:
        p.join()
        if p.exitcode != 0:
            results.append({"error": f"worker exited with {p.exitcode} (killed for memory?)"})
    while not q.empty():
        results.append(q.get())
    return sorted(results, key=lambda r: r.get("rank", 99))


def minilm_train_rate(path: Path, steps: int = 3) -> dict:
    """Pairs/s of all-MiniLM-L6-v2 forward+backward (query and positive, max_length 128) here."""
    import torch

    from negatron.trainers.encoder import Encoder

    torch.set_num_threads(os.cpu_count() or 1)
    enc = Encoder.from_pretrained("default", max_length=128)
    enc.train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-5)
    t = pq.ParquetFile(path).read_row_group(0)
    q, p = t.column("query").to_pylist(), t.column("positive").to_pylist()
    times = []
    for s in range(steps + 1):
        sl = slice(s * BATCH, (s + 1) * BATCH)
        t0 = time.perf_counter()
        a, b = enc(**enc.tokenize(q[sl], 128)), enc(**enc.tokenize(p[sl], 128))
        loss = torch.nn.functional.cross_entropy(a @ b.T / 0.05, torch.arange(len(a)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {"pairs_per_s": round(BATCH / float(np.mean(times)), 2), "batch": BATCH, "steps": steps,
            "threads": torch.get_num_threads()}


def before_module(commit: str, tmp: Path) -> str:
    """The ``trainers/data.py`` of ``commit`` as an importable module of the installed package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:trainers/data.py"], capture_output=True,
                         text=True, check=True).stdout
    import negatron.trainers as pkg

    name = f"data_before_{commit[:8]}"
    target = Path(pkg.__path__[0]) / f"{name}.py"
    target.write_text(src)
    return f"negatron.trainers.{name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000,5000000")
    ap.add_argument("--before", help="a commit whose in-memory stream is measured as the 'before' rows")
    ap.add_argument("--skip-model", action="store_true", help="do not measure MiniLM's training rate")
    ap.add_argument("--shuffle-rows", type=int, default=65536, help="data.shuffle_rows (default: the config default)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    out: dict = {"batch_per_worker": BATCH, "workers": WORLD, "steps": STEPS, "code": "before" if args.before else "now",
                 "shuffle_rows": None if args.before else args.shuffle_rows,
                 "commit": args.before or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                         capture_output=True, text=True).stdout.strip(),
                 "sizes": []}
    module = None
    with tempfile.TemporaryDirectory(prefix="negatron-scale-") as tmp:
        tmp = Path(tmp)
        if args.before:
            module = before_module(args.before, tmp)
        try:
            for rows in (int(s) for s in args.sizes.split(",")):
                path = tmp / f"pairs_{rows}.parquet"
                facts = write_pairs(path, rows)
                print(f"[scale_ingest] {rows} rows: {facts}", file=sys.stderr, flush=True)
                workers = run_size(path, module, args.shuffle_rows)
                print(f"[scale_ingest] {rows} rows: {workers}", file=sys.stderr, flush=True)
                out["sizes"].append({**facts, "workers": workers})
                if rows == min(int(s) for s in args.sizes.split(",")) and not args.skip_model:
                    out["minilm_train"] = minilm_train_rate(path)
                path.unlink()
        finally:
            if module:
                import negatron.trainers as pkg

                (Path(pkg.__path__[0]) / f"{module.rsplit('.', 1)[1]}.py").unlink(missing_ok=True)
    ok = [s for s in out["sizes"] if all("peak_rss_mb" in w for w in s["workers"])]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        peak = lambda s: max(w["peak_rss_mb"] for w in s["workers"])  # noqa: E731
        out["rss_growth"] = {"from_rows": first["rows"], "to_rows": last["rows"],
                             "ratio": round(peak(last) / peak(first), 3)}
    if "minilm_train" in out and ok:
        slowest = min(w["pairs_per_s"] for s in ok for w in s["workers"])
        out["ingest_over_training"] = round(slowest / out["minilm_train"]["pairs_per_s"], 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

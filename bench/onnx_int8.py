"""The ONNX backend and int8 against torch fp32, in process: dev MRR@10 on the built-in stdlib data
and embedding speed; prints JSON.

    .venv/bin/python bench/onnx_int8.py [--data DIR] [--threads 1,2] [--texts 512] [--out FILE]

- quality: ``negatron eval``'s evaluator on the dev split (all queries and docs) with the
  packaged all-MiniLM-L6-v2 as torch fp32, ONNX fp32 and ONNX int8 (per-channel MatMul weights);
- speed: texts/s embedding ``--texts`` one-line and short texts of the built-in data in batches of
  32 (the server's chunk), after one warm-up pass, for each thread count; and for single texts
  (batch 1), the latency a lone request sees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rate(model, texts: list[str], batch: int, repeat: int = 3) -> float:
    model.encode(texts[:batch * 2], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        model.encode(texts, batch_size=batch)
    return len(texts) * repeat / (time.perf_counter() - t0)


def _single_ms(model, texts: list[str], n: int = 100) -> float:
    model.encode(texts[:4], batch_size=1)
    t0 = time.perf_counter()
    for t in texts[:n]:
        model.encode([t], batch_size=1)
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="an existing `negatron data stdlib` folder (default: built in a temp folder)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from negatron.trainers import onnx_backend as ob
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder
    from negatron.trainers.stdlib_data import build_stdlib_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            build_stdlib_dataset(data)
        dev = str(data / "dev")
        checks = {}
        int8_dir, checks["int8_gate"] = ob.prepare("default", "int8", dev, out=Path(tmp) / "int8")
        fp32_dir = ob.export("default", "none")
        texts = [t.split("\n")[0][:200] for t in pq.read_table(data / "dev" / "queries.parquet").column("text").to_pylist()]
        texts = (texts * (args.texts // max(1, len(texts)) + 1))[:args.texts]
        out = {"model": "all-MiniLM-L6-v2", "dev": {"queries": None, "docs": None}, "quality": {}, "speed": {}}
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            models = {"torch_fp32": Encoder.from_pretrained("default").eval(),
                      "onnx_fp32": ob.OnnxEncoder(fp32_dir, threads), "onnx_int8": ob.OnnxEncoder(int8_dir, threads)}
            if not out["quality"]:
                for name, m in models.items():
                    r = evaluate_encoder(m, dev, progress=False)
                    out["quality"][name] = {"dev_mrr@10": round(r["mrr@10"], 4), "dev_ndcg@10": round(r["ndcg@10"], 4)}
                    out["dev"] = {"queries": r["num_queries"], "docs": r["num_docs"]}
            out["speed"][f"threads_{threads}"] = {
                name: {"texts_per_s_batch32": round(_rate(m, texts, 32), 1),
                       "ms_per_single_text": round(_single_ms(m, texts), 2)} for name, m in models.items()}
            print(json.dumps({threads: out["speed"][f"threads_{threads}"]}), file=sys.stderr, flush=True)
        q = out["quality"]
        out["int8_dev_mrr@10_change"] = round(q["onnx_int8"]["dev_mrr@10"] - q["torch_fp32"]["dev_mrr@10"], 4)
        for k, sp in out["speed"].items():
            sp["int8_over_torch_fp32"] = round(sp["onnx_int8"]["texts_per_s_batch32"] / sp["torch_fp32"]["texts_per_s_batch32"], 3)
            sp["onnx_fp32_over_torch_fp32"] = round(sp["onnx_fp32"]["texts_per_s_batch32"] / sp["torch_fp32"]["texts_per_s_batch32"], 3)
        out["gate"] = checks["int8_gate"]
    from emit import emit  # bench/ is on sys.path when a bench runs as a script

    emit(out, args.out)


if __name__ == "__main__":
    main()

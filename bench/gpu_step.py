"""The training step on one GPU at a global batch of 4096: samples/s and peak GPU memory for fp32,
bf16, bf16 + gradient checkpointing and bf16 + the cached loss, against sentence-transformers'
CachedMultipleNegativesRankingLoss on the same model, data and batch; prints JSON.

    python bench/gpu_step.py [--batch 4096] [--mini-batch 256] [--steps 3] [--device cuda] [--out FILE]

Every point is a fresh process (``train_memory.measure``): the packaged all-MiniLM-L6-v2, real
pairs from the standard library's source (``max_length`` 128), AdamW, one warm-up step and
``--steps`` timed ones (the fastest is reported). A point that runs out of memory reports it. The
sentence-transformers points run its loss's own cached backward, scale 20 (τ 0.05), the same
mini-batch size, in fp32 and under bf16 autocast (as its trainer's ``bf16=True`` does). Its
gradient pass is replayed in a backward hook, outside the autocast region, so there only its
no-gradient pass runs in bf16; Negatron's ``bf16_cached`` runs both passes in bf16. On CPUs
without bf16 units, bf16 is emulated and much slower than fp32 (measured here: 16× for one
step of 32), so the CPU check below is about code paths, not speed.

Needs a CUDA machine; a few minutes on one H100-class GPU (7 points, each a fresh process). ``--device cpu --batch 64
--mini-batch 16`` runs the same code on a CPU (a check, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def st_point(batch: int, mini: int, steps: int, device: str, max_length: int, bf16: bool = True) -> dict:
    """sentence-transformers' CachedMultipleNegativesRankingLoss: one warm-up step, ``steps`` timed."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    from negatron.trainers.model_io import resolve_model_path
    from train_memory import pairs

    dev = torch.device(device)
    model = SentenceTransformer(str(resolve_model_path("default")), device=device)
    model.max_seq_length = max_length
    loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    queries, positives = pairs(batch * (steps + 1))
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for s in range(steps + 1):
        sl = slice(s * batch, (s + 1) * batch)
        feats = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in model.tokenize(texts).items()}
                 for texts in (queries[sl], positives[sl])]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(feats, None)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if s:
            times.append(time.perf_counter() - t0)
    out = {"batch": batch, "mini_batch_size": mini, "precision": "bf16 autocast" if bf16 else "fp32", "peer": "sentence-transformers "
           "CachedMultipleNegativesRankingLoss", "s_per_step": round(min(times), 3),
           "samples_per_s": round(batch / min(times), 1), "loss": round(float(loss), 4)}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    return out


def st_measure(batch: int, mini: int, steps: int, device: str, max_length: int = 128, bf16: bool = True) -> dict:
    code = (f"import sys, json; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]; import gpu_step as g; "
            f"print('RESULT' + json.dumps(g.st_point({batch}, {mini}, {steps}, {device!r}, {max_length}, {bf16})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"batch": batch, "peer": "sentence-transformers", "error": tail[0][:300]}


def main() -> dict:
    from embed_index import emit
    from train_memory import measure

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--mini-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("BENCH_THREADS", "4")
    b, m, n, d = args.batch, args.mini_batch, args.steps + 1, args.device  # +1: the first step warms up
    t0 = time.perf_counter()
    points = {
        "fp32": measure(b, 0, "fp32", False, n, d),
        "bf16": measure(b, 0, "bf16", False, n, d),
        "bf16_checkpointing": measure(b, 0, "bf16", True, n, d),
        "bf16_cached": measure(b, m, "bf16", False, n, d),
        "fp32_cached": measure(b, m, "fp32", False, n, d),
        "sentence_transformers_cached_bf16": st_measure(b, m, args.steps, d),
        "sentence_transformers_cached_fp32": st_measure(b, m, args.steps, d, bf16=False),
    }
    if d.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = None
    result = {"device": d, "gpu": gpu, "batch": b, "mini_batch_size": m, "model": "all-MiniLM-L6-v2", "max_length": 128,
              "points": points, "wall_s": round(time.perf_counter() - t0, 1)}
    for prec in ("bf16", "fp32"):
        ours, peer = points[f"{prec}_cached"], points[f"sentence_transformers_cached_{prec}"]
        if "samples_per_s" in ours and "samples_per_s" in peer:
            result[f"cached_{prec}_vs_sentence_transformers_speed"] = round(ours["samples_per_s"] / peer["samples_per_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()

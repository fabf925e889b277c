"""Peak memory of one training worker's step against its batch size, with and without the cached
loss (``trainer.mini_batch_size``); prints JSON.

    python bench/train_memory.py [--batches 32,128,512] [--mini-batch 32] [--steps 1] [--out FILE]

Each point is a fresh process (so peak RSS is that point's alone) that builds the packaged
all-MiniLM-L6-v2 bi-encoder, the training model (τ 0.05, no bank) and AdamW, then runs
``--steps`` optimizer steps of ``ContrastiveModel.forward_backward`` on real pairs (12-line windows
of the standard library's source as positives, their first line as queries, ``max_length`` 128).
Reported: the process's peak RSS (``ru_maxrss``) and its RSS before the first step (model,
optimizer and data loaded), and seconds per step. On CUDA (``--device cuda``) the peak is
``torch.cuda.max_memory_allocated`` instead.

The target (issue #19): with the cached loss, peak RSS at per-worker batch 512 within 15 % of that
at 32; without it, the growth as measured.
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


def pairs(n: int) -> tuple[list[str], list[str]]:
    from serve_load import stdlib_windows

    _, texts = stdlib_windows(n)
    return [t.splitlines()[0][:200] for t in texts], texts


def one_point(batch: int, mini: int, precision: str, checkpointing: bool, steps: int, device: str,
              max_length: int) -> dict:
    """Run in the child: ``steps`` steps at ``batch``; memory and time."""
    import resource

    import torch

    from negatron.trainers.encoder import Encoder
    from negatron.trainers.precision import set_precision
    from negatron.trainers.step import ContrastiveModel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    dev = torch.device(device)
    enc = Encoder.from_pretrained("default", max_length=max_length)
    model = ContrastiveModel(enc, temperature=0.05, mini_batch_size=mini).to(dev)
    set_precision(model, precision)
    if checkpointing:
        enc.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-5)
    queries, positives = pairs(batch * steps)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for s in range(steps):
        sl = slice(s * batch, (s + 1) * batch)
        b = {"query": queries[sl], "positive": positives[sl], "pos_ids": torch.arange(s * batch, (s + 1) * batch)}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = model.forward_backward(b, s)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    out = {"batch": batch, "mini_batch_size": mini, "precision": precision, "gradient_checkpointing": checkpointing,
           "s_per_step": round(min(times), 2), "samples_per_s": round(batch / min(times), 1), "loss": round(float(loss), 4)}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    else:
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out["rss_before_step_mb"] = round(rss_before / 2**20)
    return out


def measure(batch: int, mini: int = 0, precision: str = "fp32", checkpointing: bool = False, steps: int = 1,
            device: str = "cpu", max_length: int = 128, timeout_s: int = 1800) -> dict:
    """One point in a fresh child process (its JSON), or {"error": ...} (out of memory, a crash)."""
    code = (f"import sys, json; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]; import train_memory as t; "
            f"print('RESULT' + json.dumps(t.one_point({batch}, {mini}, {precision!r}, {checkpointing}, {steps}, "
            f"{device!r}, {max_length})))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"batch": batch, "mini_batch_size": mini, "precision": precision, "error": f"over {timeout_s} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"batch": batch, "mini_batch_size": mini, "precision": precision,
            "error": ("out of memory: " if "out of memory" in p.stderr.lower() else "") + tail[0][:300]}


def main() -> dict:
    from embed_index import emit

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="32,128,512")
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["plain", "cached"], default=None,
                    help="measure one kind again, keeping the other's points from --out")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = {"plain": [], "cached": []}
    if args.only and args.out and Path(args.out).is_file():
        rows = json.loads(Path(args.out).read_text())["points"]
        rows[args.only] = []
    for b in batches:
        for kind, mini in (("plain", 0), ("cached", args.mini_batch)):
            if args.only in (None, kind):
                rows[kind].append(measure(b, mini, steps=args.steps, device=args.device))
                print(json.dumps({kind: rows[kind][-1]}), file=sys.stderr)
    key = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"

    def growth(points):
        ok = [p for p in points if key in p]
        return round(ok[-1][key] / ok[0][key], 3) if len(ok) == len(points) and ok else None

    result = {"machine": {"cpus": os.cpu_count(), "device": args.device}, "model": "all-MiniLM-L6-v2",
              "max_length": 128, "mini_batch_size": args.mini_batch, "points": rows,
              f"plain_{key}_ratio_{batches[-1]}_vs_{batches[0]}": growth(rows["plain"]),
              f"cached_{key}_ratio_{batches[-1]}_vs_{batches[0]}": growth(rows["cached"])}
    ratio = result[f"cached_{key}_ratio_{batches[-1]}_vs_{batches[0]}"]
    result["target_cached_within_15pct"] = None if ratio is None else ratio <= 1.15
    return emit(result, args.out)


if __name__ == "__main__":
    main()

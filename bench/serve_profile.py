"""Where a request's CPU goes in ``negatron serve``: py-spy samples of each Serve process under load;
prints JSON.

    pip install py-spy
    .venv/bin/python bench/serve_profile.py [--concurrency 32] [--seconds 20] [--threads 1]
        [--negatron-args "serve.encoder.backend=onnx"] [--out FILE]

Starts ``negatron serve --model default`` (plus ``--negatron-args``; extra environment variables are
passed through, e.g. Ray Serve's ``RAY_SERVE_*`` flags), loads it with the closed-loop one-text
clients of ``bench/serve_peer.py`` and, while the load runs, records every Serve process (HTTP proxy,
Ingress, Encoder) with ``py-spy record --nonblocking`` for ``--seconds``. For each process it
reports the CPU cores it used, the samples it spent per request served, and where its samples fall:
by package (ray, starlette/fastapi, pydantic, asyncio, grpc, torch, negatron, ...) of the innermost
frame, and the hottest innermost functions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import free_port, load, wait_http  # noqa: E402
from serve_peer import _start, _stop, _title, cpu_by_process, cpu_share, texts_for_load  # noqa: E402

ROLES = {"ProxyActor": "proxy", ":Ingress": "ingress", ":Encoder": "encoder"}  # in Ray's process titles
PACKAGES = ("ray", "starlette", "fastapi", "pydantic", "uvicorn", "h11", "httptools", "asyncio", "grpc", "torch",
            "transformers", "tokenizers", "numpy", "prometheus_client", "opentelemetry", "negatron", "json",
            "concurrent", "threading", "logging")


def package_of(frame: str) -> str:
    """'func (path/to/module.py:12)' -> the package the file belongs to."""
    path = frame[frame.rfind("(") + 1:].split(":")[0]
    parts = Path(path).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    for p in PACKAGES:
        if f"/{p}/" in path or path.startswith(p + "/") or Path(path).stem == p:
            return p
    if str(ROOT) in path:
        return "negatron"
    return Path(path).stem or "?"


def summarize(raw: Path, served: int, top: int) -> dict:
    """py-spy's raw (collapsed) output: 'frame;frame;...;leaf count' per line, outermost first."""
    leaves: collections.Counter = collections.Counter()
    packages: collections.Counter = collections.Counter()
    total = 0
    idle = ("select", "epoll_wait", "poll ", "wait (threading", "_worker (concurrent", "sleep")
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if any(leaf.startswith(i) for i in idle):
            continue  # --idle is off, but a thread can be sampled on its way into a wait
        total += int(n)
        leaves[leaf] += int(n)
        packages[package_of(leaf)] += int(n)
    return {"samples": total, "samples_per_request": round(total / served, 2) if served else None,
            "by_package": {k: round(v / total, 3) for k, v in packages.most_common(12)} if total else {},
            "hottest": [{"frame": k, "share": round(v / total, 3)} for k, v in leaves.most_common(top)] if total else []}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--negatron-args", default="")
    ap.add_argument("--out")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "negatron.cluster.cli", "serve", "--model", "default", f"serve.port={port}",
           f"serve.encoder.scale.torch_threads={args.threads}", *shlex.split(args.negatron_args)]
    texts = texts_for_load()
    bodies = [{"input": t, "model": "default"} for t in texts]
    out: dict = {"command": " ".join(cmd[3:]), "concurrency": args.concurrency, "seconds": args.seconds,
                 "threads": args.threads, "ray_serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}
    with tempfile.TemporaryDirectory() as d:
        proc = _start(cmd, env, Path(d) / "serve.log")
        try:
            wait_http(url, "/healthz", timeout=600)
            asyncio.run(load(url, "/v1/embeddings", bodies, args.concurrency, 3.0, warmup_s=0.0))  # warm
            import psutil

            pids = {}
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                title = _title(p)
                for tag, role in ROLES.items():
                    if title.startswith("ray::") and title.endswith(tag) or (tag == "ProxyActor" and tag in title):
                        pids[role] = p.pid
            recs = {}
            for role, pid in pids.items():
                raw = Path(d) / f"{role}.txt"
                recs[role] = (raw, subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", str(args.rate),
                     "--nonblocking", "--format", "raw", "--output", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            before, t0 = cpu_by_process(proc.pid), time.perf_counter()
            res: dict = {}
            th = threading.Thread(target=lambda: res.update(asyncio.run(
                load(url, "/v1/embeddings", bodies, args.concurrency, args.seconds, warmup_s=0.0))))
            th.start()
            th.join()
            cores = cpu_share(before, cpu_by_process(proc.pid), time.perf_counter() - t0)
            for _, p in recs.values():
                p.wait(120)
            out["load"] = res
            out["cores_by_process"] = cores
            out["processes"] = {role: summarize(raw, res.get("requests", 0), args.top)
                                for role, (raw, _) in recs.items() if raw.exists()}
        finally:
            _stop(proc)
    from emit import emit

    emit(out, args.out)


if __name__ == "__main__":
    main()

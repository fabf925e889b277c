"""Online-inference load test. Prints JSON.

For all-MiniLM-L6-v2 at concurrency 1, 8 and 32 (one text per request, the shape of online
traffic), throughput (texts/s) and p50/p99 latency of:

  (a) the Negatron encoder deployment behind the Negatron ingress (dynamic batching on),
  (b) the same deployment with batching off (max_batch_size 1),
  (c) a plain single-process FastAPI + sentence-transformers server under uvicorn, the server
      users would otherwise write.

Then ``/search`` latency p50/p99 on an index over ``--search-docs`` documents (windows of Python
standard-library source; built once and cached, as the Retriever does).

    .venv/bin/python bench/serve_load.py [--seconds 20] [--search-docs 100000] [--skip-search]

Targets on a 2-core machine: at concurrency 32, (a) >= 2x the throughput of (b) and >= 1.0x (c),
with p99 of (a) below (c)'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASELINE = textwrap.dedent('''
    import sys, torch
    from typing import Union
    from fastapi import FastAPI
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(int(sys.argv[2]))
    model = SentenceTransformer(sys.argv[1], device="cpu")
    app = FastAPI()
    class Req(BaseModel):
        input: Union[str, list[str]]
    @app.post("/v1/embeddings")
    def embed(req: Req):
        texts = [req.input] if isinstance(req.input, str) else req.input
        emb = model.encode(texts, batch_size=32)
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e.tolist()}
                                           for i, e in enumerate(emb)]}
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


async def load(url: str, path: str, bodies: list[dict], concurrency: int, seconds: float, warmup_s: float = 3.0) -> dict:
    """``concurrency`` closed-loop clients for ``seconds`` (after a warm-up); latency in ms."""
    import httpx

    lat: list[float] = []
    texts = 0
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal texts, errors
            i = w
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                body = bodies[i % len(bodies)]
                i += concurrency
                r = await client.post(path, json=body)
                t1 = time.perf_counter()
                if t0 >= t_measure and t1 <= t_end:
                    if r.status_code == 200:
                        lat.append((t1 - t0) * 1000)
                        inp = body.get("input", body.get("query"))
                        texts += 1 if isinstance(inp, str) else len(inp)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "texts_per_s": round(texts / seconds, 2), "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1)}


def wait_http(url: str, path: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}{path} did not come up in {timeout}s")


def stdlib_windows(n: int, lines: int = 12, stride: int = 6) -> tuple[list[str], list[str]]:
    """``n`` real documents: windows of the standard library's source files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids, texts = [], []
    for f in sorted(root.rglob("*.py")):
        try:
            src = f.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, max(1, len(src) - lines), stride):
            chunk = "\n".join(src[start:start + lines]).strip()
            if len(chunk) < 40:
                continue
            ids.append(f"{f.relative_to(root)}:{start + 1}")
            texts.append(chunk)
            if len(ids) >= n:
                return ids, texts
    return ids, texts


def section_for(model: str, port: int, batch: int, threads: int, corpus: str = "", cache: str = "",
                max_length: int = 128, colocate: bool = False, batch_wait_s: float = 0.05):
    from negatron.cluster.config import load_config
    from negatron.serve.app import resolve_section

    cfg = load_config(None, [
        f"serve.encoder.path={model}", f"serve.port={port}", f"serve.encoder.max_length={max_length}",
        "serve.encoder.scale.num_cpus=1", f"serve.encoder.scale.torch_threads={threads}",
        f"serve.encoder.batch.max_batch_size={batch}", f"serve.encoder.batch.batch_wait_timeout_s={batch_wait_s}",
        "serve.encoder.scale.max_ongoing_requests=64", "serve.ingress.max_ongoing_requests=512",
        f"serve.retriever.corpus={corpus}", f"serve.retriever.cache_dir={cache}",
        f"serve.retriever.scale.torch_threads={threads}", "serve.retriever.scale.num_cpus=1",
        "serve.limits.max_top_k=100", f"serve.encoder.colocate={str(colocate).lower()}",
    ])
    return resolve_section(cfg)


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the plain server (torch's default here)")
    ap.add_argument("--replica-threads", type=int, default=1,
                    help="torch threads per Negatron replica (serve.*.scale.torch_threads; 1 avoids OpenMP spinning)")
    ap.add_argument("--batch-wait-s", type=float, default=0.05,
                    help="serve.encoder.batch.batch_wait_timeout_s (waited only while other requests are in flight)")
    ap.add_argument("--search-max-length", type=int, default=32, help="token limit of the search corpus and queries")
    ap.add_argument("--search-docs", type=int, default=100_000)
    ap.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "negatron_bench_index"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from negatron.serve.app import start
    from negatron.trainers.encoder import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    conc = [int(c) for c in args.concurrency.split(",")]
    queries, _ = stdlib_windows(400, lines=1, stride=37)  # short, varied single-line texts
    bodies = [{"input": q, "model": "default"} for q in queries]
    out: dict = {"model": args.model, "seconds_per_point": args.seconds, "torch_threads": args.threads,
                 "cpus": os.cpu_count(), "texts_per_request": 1, "batch_wait_s": args.batch_wait_s,
                 "results": {}}

    # (c) plain FastAPI + sentence-transformers, alone on the machine
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "plain_server.py"
        script.write_text(BASELINE)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c",
                                 f"import sys; sys.argv=['x', {model_dir!r}, '{args.threads}']; sys.path.insert(0, {d!r});"
                                 f"import uvicorn, plain_server; uvicorn.run(plain_server.app, host='127.0.0.1', port={port}, log_level='warning')"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, "/docs")
            out["results"]["plain_fastapi_st"] = [asyncio.run(load(url, "/v1/embeddings", bodies, c, args.seconds)) for c in conc]
            print(json.dumps({"plain_fastapi_st": out["results"]["plain_fastapi_st"]}), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    from negatron.cluster.local import init_local  # workers know their own cluster's address
    init_local(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for name, batch, colo in [("negatron_batched", 32, False), ("negatron_unbatched", 1, False),
                                  ("negatron_colocated_batched", 32, True), ("negatron_colocated_unbatched", 1, True)]:
            port = free_port()
            url = start(section_for(args.model, port, batch, args.replica_threads, colocate=colo,
                                    batch_wait_s=args.batch_wait_s))
            out["results"][name] = [asyncio.run(load(url, "/v1/embeddings", bodies, c, args.seconds)) for c in conc]
            print(json.dumps({name: out["results"][name]}), file=sys.stderr)
            serve.shutdown()

        if not args.skip_search:
            import torch

            from negatron.serve.index import load_or_build, write_corpus
            from negatron.trainers.encoder import Encoder

            ids, texts = stdlib_windows(args.search_docs, lines=4, stride=3)
            ml = args.search_max_length
            corpus = write_corpus(Path(args.cache_dir) / f"stdlib_{len(ids)}.parquet", ids, texts)
            # prebuild the cache with the same encoder and settings the Retriever uses
            torch.set_num_threads(max(2, args.threads))
            enc = Encoder.from_pretrained(model_dir)
            t0 = time.perf_counter()
            idx = load_or_build(corpus, model_dir, lambda t: enc.encode(t, 128, ml, progress="embed corpus"),
                                kind=args.index, cache_dir=args.cache_dir, embed_settings={"max_length": ml},
                                hnsw_m=32, hnsw_ef_search=64, ivf_nlist=0, ivf_nprobe=16)
            build_s = time.perf_counter() - t0
            port = free_port()
            url = start(section_for(args.model, port, 32, args.replica_threads, corpus=str(corpus),
                                    cache=args.cache_dir, max_length=ml))
            qbodies = [{"query": q, "top_k": 10} for q in queries]
            out["search"] = {"docs": len(ids), "index": args.index, "index_build_s": round(build_s, 1),
                             "max_length": ml,
                             "from_cache": idx.from_cache,
                             "load": [asyncio.run(load(url, "/search", qbodies, c, args.seconds)) for c in (1, 8)]}
            serve.shutdown()
    finally:
        ray.shutdown()

    res = out["results"]
    at = {k: {r["concurrency"]: r for r in v} for k, v in res.items()}
    top = max(conc)
    c = at["plain_fastapi_st"][top]
    out["at_max_concurrency"] = {}
    for mode, (ka, kb) in {"separate_encoder": ("negatron_batched", "negatron_unbatched"),
                           "colocated": ("negatron_colocated_batched", "negatron_colocated_unbatched")}.items():
        a, b = at[ka][top], at[kb][top]
        out["at_max_concurrency"][mode] = {
            "concurrency": top,
            "batched_vs_unbatched_throughput": round(a["texts_per_s"] / b["texts_per_s"], 2),
            "batched_vs_plain_throughput": round(a["texts_per_s"] / c["texts_per_s"], 2),
            "p99_batched_ms": a["p99_ms"], "p99_plain_ms": c["p99_ms"],
            "targets_met": a["texts_per_s"] >= 2 * b["texts_per_s"] and a["texts_per_s"] >= c["texts_per_s"]
                           and a["p99_ms"] < c["p99_ms"],
        }
    return out


if __name__ == "__main__":
    # Ray's forwarded worker and raylet lines (which can arrive while Serve shuts down) go to
    # stderr for the whole run: stdout holds only the JSON
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    real_stdout.write(json.dumps(result, indent=2) + "\n")

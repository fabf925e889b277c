"""Negatron's server against a dedicated embedding server, Infinity, side by side on the same
cores; prints JSON.

    pip install "infinity-emb[server,torch]"      # into this venv, or any other (see --infinity-python)
    .venv/bin/python bench/serve_peer.py [--seconds 20] [--concurrency 1,8,32] [--threads 2]
        [--negatron-args "serve.encoder.backend=onnx"] [--out FILE]

Negatron does not depend on Infinity: this bench only starts it when ``infinity_emb`` can be
imported by ``--infinity-python`` (default: this interpreter).

One after the other, never at once, on 127.0.0.1 with the same all-MiniLM-L6-v2 folder (the
packaged one) and the same torch threads:

1. Infinity (``infinity_emb v2``, torch engine, CPU, its default batching, ``--batch-size 32``),
   its OpenAI-style route under ``/v1``;
2. ``negatron serve --model default`` with its defaults (plus ``--negatron-args``).

Both get the same closed-loop load (``bench/serve_load.load``): one text per request from the
built-in data (stdlib function docstrings and bodies), at each concurrency for ``--seconds``
after a 3 s warm-up. Reported: texts/s, p50/p99 ms, the ratios Negatron / Infinity, and the
cosine between both servers' embeddings of the same texts (they must agree: ≥ 0.999).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import free_port, load, wait_http  # noqa: E402


def texts_for_load(n: int = 512) -> list[str]:
    """Short real texts: the queries and function bodies the built-in stdlib data is made of."""
    from negatron.trainers.onnx_backend import calibration_texts

    out = []
    for t in calibration_texts(n):
        first = t.split("\n\n", 1)[0].strip()
        if first:
            out.append(first[:300])
    return out


def _infinity_ok(python: str) -> bool:
    return subprocess.run([python, "-c", "import infinity_emb"], capture_output=True).returncode == 0


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(ROOT))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _embed(url: str, texts: list[str], model: str) -> np.ndarray:
    import httpx

    r = httpx.post(url + "/v1/embeddings", json={"input": texts, "model": model}, timeout=120)
    r.raise_for_status()
    return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], dtype=np.float32)


def _title(p) -> str:
    """A process's role: Ray's titles (ray::ServeReplica:app:Deployment, ray::ProxyActor), or its
    executable's name."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - gone
        return "?"
    first = cmd[0] if cmd else p.name()
    if first.startswith("ray::"):
        return first.split(" ")[0]
    name = Path(first).name
    if name.startswith("python") and len(cmd) > 1:  # a Python process: name it by its script or module
        return name + " " + " ".join(Path(c).name for c in cmd[1:3])
    return name


def cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a server process and all its descendants, by role."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[f"{_title(p)}#{p.pid}"] = t.user + t.system
        except psutil.Error:
            continue
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores used per role over ``wall`` seconds (the load's warm-up included), largest first."""
    used: dict[str, float] = {}
    for k, v in after.items():
        role = k.rsplit("#", 1)[0]
        used[role] = used.get(role, 0.0) + (v - before.get(k, 0.0)) / wall
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def run_server(name: str, cmd: list[str], env: dict, url: str, ready_path: str, model: str, texts: list[str],
               levels: list[int], seconds: float, logdir: Path) -> tuple[dict, np.ndarray]:
    print(f"[{name}] starting: {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = _start(cmd, env, logdir / f"{name}.log")
    try:
        wait_http(url, ready_path, timeout=600)
        start_s = time.perf_counter() - t0
        emb = _embed(url, texts[:64], model)
        bodies = [{"input": t, "model": model} for t in texts]
        points = []
        for c in levels:
            before, t_cpu = cpu_by_process(proc.pid), time.perf_counter()
            p = asyncio.run(load(url, "/v1/embeddings", bodies, c, seconds))
            p["cores_by_process"] = cpu_share(before, cpu_by_process(proc.pid), time.perf_counter() - t_cpu)
            print(f"[{name}] concurrency {c}: {p}", file=sys.stderr, flush=True)
            points.append(p)
        return {"start_s": round(start_s, 1), "points": points}, emb
    finally:
        _stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server (the machine's cores)")
    ap.add_argument("--infinity-python", default=sys.executable,
                    help="a Python that can import infinity_emb (e.g. another venv's)")
    ap.add_argument("--infinity-args", default="--engine torch --device cpu --batch-size 32 --no-bettertransformer",
                    help="extra `infinity_emb v2` arguments")
    ap.add_argument("--negatron-args", default="", help="extra `negatron serve` overrides, e.g. serve.encoder.backend=onnx")
    ap.add_argument("--only", default="infinity,negatron")
    ap.add_argument("--out")
    args = ap.parse_args()

    from negatron.trainers.model_io import resolve_model_path

    folder = str(resolve_model_path("default"))
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = texts_for_load()
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    env = {**os.environ, **threads}
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "negatron-serve-peer"
    logdir.mkdir(parents=True, exist_ok=True)
    out = {"model": "all-MiniLM-L6-v2", "folder": "the packaged all-MiniLM-L6-v2 (negatron's 'default')", "seconds": args.seconds, "threads": args.threads,
           "texts": len(texts), "cpus": os.cpu_count(), "servers": {}}
    emb = {}
    only = set(args.only.split(","))
    if "infinity" in only:
        if not _infinity_ok(args.infinity_python):
            out["servers"]["infinity"] = {"skipped": f"infinity_emb is not importable by {args.infinity_python}; "
                                                     "pip install 'infinity-emb[server,torch]'"}
        else:
            port = free_port()
            cmd = [args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", folder, "--port", str(port),
                   "--host", "127.0.0.1", "--url-prefix", "/v1", "--served-model-name", "all-MiniLM-L6-v2",
                   *shlex.split(args.infinity_args)]
            res, emb["infinity"] = run_server("infinity", cmd, env, f"http://127.0.0.1:{port}", "/v1/models",
                                              "all-MiniLM-L6-v2", texts, levels, args.seconds, logdir)
            shown = " ".join(cmd[1:]).replace(folder, "MODEL").replace(f"--port {port}", "--port PORT")
            out["servers"]["infinity"] = {"command": shown, **res}
    if "negatron" in only:
        port = free_port()
        cmd = [sys.executable, "-m", "negatron.cluster.cli", "serve", "--model", "default", f"serve.port={port}",
               f"serve.encoder.scale.torch_threads={args.threads}", *shlex.split(args.negatron_args)]
        res, emb["negatron"] = run_server("negatron", cmd, env, f"http://127.0.0.1:{port}", "/healthz", "default",
                                          texts, levels, args.seconds, logdir)
        out["servers"]["negatron"] = {"command": " ".join(cmd[3:]), **res}
    if len(emb) == 2:
        a, b = emb["infinity"], emb["negatron"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out["same_embeddings"] = {"cosine_min": round(float(cos.min()), 6), "ok": bool(cos.min() >= 0.999)}
        ratios = []
        for pi, pn in zip(out["servers"]["infinity"]["points"], out["servers"]["negatron"]["points"]):
            ratios.append({"concurrency": pi["concurrency"],
                           "texts_per_s": round(pn["texts_per_s"] / pi["texts_per_s"], 3) if pi["texts_per_s"] else None,
                           "p99": round(pn["p99_ms"] / pi["p99_ms"], 3) if pi["p99_ms"] else None})
        out["negatron_over_infinity"] = ratios
    from emit import emit  # bench/ is on sys.path when a bench runs as a script

    emit(out, args.out)


if __name__ == "__main__":
    main()

"""What faults cost. Prints JSON.

Training: the same run on the built-in stdlib data, clean and with two worker processes killed
(SIGKILL, at a random moment after a checkpoint; ``trainer.max_failures=2``): the wall-time
overhead and the steps redone (progress lost between the last checkpoint and each kill).

Serving: ``negatron serve`` (the packaged model) under a 4-client load on ``/v1/embeddings``; the
Encoder replica process is killed: requests that failed (and how), and the time until every
request succeeds again. Then SIGTERM under the same load: what in-flight requests got.

Flood: 4 valid clients alone, then beside 32 hostile ones for 60 s (image decompression bombs,
100k-text bodies, invalid JSON, slow senders): the valid requests' success rate and p99, quiet
and during the flood (target: 100% and p99 within 3x of the quiet p99), and what the hostile
requests got.

    .venv/bin/python bench/faults.py [--model default] [--steps 100] [--skip-train] [--skip-serve]
        [--skip-flood] [--flood-clients 32] [--flood-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEP_LINE = re.compile(r"\[negatron\] step (\d+)/")


class StepWatcher:
    """Stands in for stdout, where Ray prints the workers' log lines: remembers the step logged
    last and passes the text on to stderr (stdout is kept for the JSON)."""

    def __init__(self, inner):
        self.inner, self.step = inner, 0

    def write(self, s: str) -> int:
        for m in STEP_LINE.finditer(s):
            self.step = int(m.group(1))  # the latest line: after a resume the steps go back
        return self.inner.write(s)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def bench_training(args, tmp: Path) -> dict:
    import ray

    from negatron.cluster.config import load_config
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from bench.loadgen import tagged_pids
    from negatron.trainers.train import registered_steps, run_training

    data = tmp / "data"
    build_stdlib_dataset(data)
    from negatron.cluster.local import init_local  # workers know their own cluster's address
    init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=True)
    watcher = StepWatcher(sys.stderr)
    real_stdout, sys.stdout = sys.stdout, watcher
    out: dict = {"model": args.model, "steps": args.steps, "checkpoint_every": args.every}
    try:
        def cfg(name):
            return load_config(None, [
                f"model.path={args.model}", f"data.train={data / 'train.parquet'}", f"model.max_length={args.seq}",
                "trainer.num_workers=2", "trainer.batch_size=16", "trainer.cpus_per_worker=1",
                f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.every}",
                "trainer.max_failures=2", "trainer.keep_checkpoints=100", "bank.size=256",
                "trainer.log_every_s=0.001", f"run.storage_path={tmp}", f"run.name={name}"])

        clean = run_training(cfg("clean"))
        out["clean_wall_s"] = clean.metrics["wall_s"]

        watcher.step = 0
        run_dir = tmp / "faulty"
        kills: list[dict] = []
        rng = random.Random(args.seed)

        def killer():
            baseline, seen = -1, set()  # kill after a checkpoint newer than baseline is registered
            deadline = time.time() + 3600
            while len(kills) < 2 and time.time() < deadline:
                pids = [p for p in tagged_pids("RayTrainWorker", os.getpid()) if p not in seen]
                newest = max(registered_steps(run_dir), default=-1)
                if len(pids) == 2 and baseline is None:
                    baseline = newest  # the restarted group is up: later checkpoints are its own
                if len(pids) == 2 and baseline is not None and newest > baseline:
                    # a random moment within the next checkpoint interval
                    time.sleep(rng.uniform(0.2, 0.8) * args.every * clean.metrics["wall_s"] / args.steps)
                    victim = rng.choice(pids)
                    at = watcher.step
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    kills.append({"pid": victim, "last_logged_step": at, "t": time.time()})
                    seen.update(pids)
                    baseline = None
                time.sleep(0.05)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        faulty = run_training(cfg("faulty"))
        t.join(5)
        history = json.loads((faulty.run_dir / "history.json").read_text())
        resumes = [h["resumed_from"] for h in history if "resumed_from" in h]
        redone = [max(0, k["last_logged_step"] - r) for k, r in zip(kills, resumes)]
        out.update({
            "kills": len(kills), "resumed_from": resumes, "killed_at_step": [k["last_logged_step"] for k in kills],
            "steps_redone": redone, "steps_redone_total": sum(redone),
            "faulty_wall_s": faulty.metrics["wall_s"], "final_step": faulty.metrics["steps"],
            "overhead_s": round(faulty.metrics["wall_s"] - clean.metrics["wall_s"], 2),
            "overhead_ratio": round(faulty.metrics["wall_s"] / clean.metrics["wall_s"], 3),
        })
    finally:
        sys.stdout = real_stdout
        ray.shutdown()
    return out


def bench_serving(args, tmp: Path) -> dict:
    from bench.loadgen import Load, ServeProcess, free_port, replica_pids, summarize

    body = {"input": ["def read_lines(path):\n    with open(path) as f:\n        return f.readlines()"] * 4}
    port = free_port()
    out: dict = {"model": args.serve_model, "clients": 4, "texts_per_request": 4}
    with ServeProcess(["--model", args.serve_model, "--port", str(port), "serve.encoder.scale.num_cpus=0.5",
                       "serve.request_timeout_s=30"], cwd=tmp) as sp:
        t0 = time.time()
        url = sp.wait_ready(600)
        out["startup_s"] = round(time.time() - t0, 1)
        load = Load(url + "/v1/embeddings", body, threads=4, timeout_s=60).start()
        time.sleep(5)
        old = replica_pids("negatron", "Encoder")
        t_kill = time.time()
        os.kill(old[0], signal.SIGKILL)
        deadline = time.time() + 300
        while time.time() < deadline:
            recent = [o for o in load.outcomes if o.start > t_kill + 1]
            if len(recent) > 30 and all(o.status == 200 for o in recent[-30:]):
                break
            time.sleep(0.5)
        time.sleep(3)
        out["hung_clients_after_kill"] = not load.stop(60)
        out["replica_kill"] = summarize(load.outcomes, t_kill)

        load = Load(url + "/v1/embeddings", body, threads=4, timeout_s=60).start()
        time.sleep(5)
        t_sig = time.time()
        rc = sp.stop(signal.SIGTERM, timeout=180)
        out["hung_clients_after_sigterm"] = not load.stop(60)
        before = [o for o in load.outcomes if o.start < t_sig]
        after = [o for o in load.outcomes if o.start >= t_sig]
        out["sigterm"] = {
            "exit_code": rc, "exit_s": round(time.time() - t_sig, 2),
            "started_before": len(before), "ok_before": sum(o.status == 200 for o in before),
            "started_after": len(after),
            "after_outcomes": sorted({str(o.status or o.error) for o in after}),
        }
    return out


def _hostile_bodies() -> dict:
    """The flood's requests: an image decompression bomb, a 100k-text body, broken JSON."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (4096, 4096), 0).save(buf, format="PNG", optimize=True)
    bomb = base64.b64encode(buf.getvalue()).decode()
    return {
        "image_bomb": ("/v1/images/embeddings", json.dumps({"model": "img", "input": [bomb] * 256}).encode()),
        "100k_texts": ("/v1/embeddings", json.dumps({"input": ["def f(): pass"] * 100_000}).encode()),
        "invalid_json": ("/v1/embeddings", b'{"input": ["unterminated'),
    }


def _slow_client(port: int, stop: threading.Event, counts: dict, lock: threading.Lock) -> None:
    """Opens a request, promises a body, dribbles it a byte per second, gives up after 20 s."""
    import socket

    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            for _ in range(20):
                if stop.is_set():
                    break
                s.sendall(b" ")
                time.sleep(1)
            s.close()
            with lock:
                counts["slow"] = counts.get("slow", 0) + 1
        except OSError:
            time.sleep(0.5)


def _cpu_by_process(root_pid: int) -> dict:
    """CPU seconds (user+system) so far of the bench process and of every process under
    ``root_pid``, summed by role (Ray actors by their ``ray::`` title)."""
    import psutil

    out: dict = {}
    procs = [psutil.Process(os.getpid())]
    try:
        root = psutil.Process(root_pid)
        procs += [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for pr in procs:
        try:
            with pr.oneshot():
                t = pr.cpu_times()
                cmd = pr.cmdline()
            if pr.pid == os.getpid():
                name = "bench clients (this process)"
            elif cmd and cmd[0].startswith("ray::"):
                name = cmd[0].split()[0].split(".")[0]
            else:
                name = pr.name()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def bench_flood(args, tmp: Path) -> dict:
    """Valid /v1/embeddings clients, quiet and then during a flood of hostile requests from
    ``args.flood_clients`` clients (image bombs, 100k-text bodies, invalid JSON, slow senders)."""
    import httpx

    from bench.loadgen import Load, ServeProcess, free_port
    from negatron.trainers.images import build_image_encoder

    build_image_encoder("cnn").save(tmp / "img")
    body = {"input": ["def read_lines(path):\n    with open(path) as f:\n        return f.readlines()"]}
    port = free_port()
    out: dict = {"valid_clients": 4, "hostile_clients": args.flood_clients, "seconds": args.flood_seconds}
    hostile = _hostile_bodies()
    out["hostile_body_bytes"] = {k: len(v[1]) for k, v in hostile.items()}
    with ServeProcess(["--model", args.serve_model, "--port", str(port), f"serve.encoder.models={{img: {tmp / 'img'}}}",
                       "serve.encoder.scale.num_cpus=0.5", "serve.request_timeout_s=30"], cwd=tmp) as sp:
        url = sp.wait_ready(600)

        def p(lat, q):
            lat = sorted(lat)
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

        def valid_phase(seconds: float) -> tuple[Load, float]:
            load = Load(url + "/v1/embeddings", body, threads=4, timeout_s=60).start()
            time.sleep(seconds)
            load.stop(60)
            return load, seconds

        def summary(load: Load) -> dict:
            ok = [o.end - o.start for o in load.outcomes if o.status == 200]
            return {"requests": len(load.outcomes), "ok": len(ok),
                    "success_rate": round(len(ok) / max(1, len(load.outcomes)), 4),
                    "p50_s": p(ok, 0.5), "p99_s": p(ok, 0.99),
                    "statuses": sorted({str(o.status or o.error) for o in load.outcomes})}

        valid_phase(5)  # warm-up: models loaded, first batches done
        q0, tq = _cpu_by_process(sp.proc.pid), time.monotonic()
        quiet, _ = valid_phase(args.flood_seconds / 2)
        q1, tq = _cpu_by_process(sp.proc.pid), time.monotonic() - tq
        out["quiet"] = summary(quiet)

        def cores(c0: dict, c1: dict, wall: float) -> dict:
            """Cores busy on average during a phase, by process (the machine has os.cpu_count())."""
            return {k: round((c1[k] - c0.get(k, 0.0)) / wall, 2)
                    for k in sorted(c1, key=lambda k: c0.get(k, 0.0) - c1[k]) if c1[k] - c0.get(k, 0.0) > 0.01 * wall}

        def flood_phase(rate: float) -> dict:
            """Valid clients during a flood; ``rate`` hostile requests/s in all (0: each hostile client
            sends its next request as soon as the last is answered, as fast as the server allows)."""
            stop, lock = threading.Event(), threading.Lock()
            answers: dict = {}
            n_slow = max(1, args.flood_clients // 8)
            n_fast = args.flood_clients - n_slow

            def hostile_client(i: int) -> None:
                kinds = list(hostile)
                gap = n_fast / rate if rate else 0.0
                due = time.monotonic() + random.random() * gap
                with httpx.Client(timeout=60) as c:
                    n = 0
                    while not stop.is_set():
                        if gap:
                            time.sleep(max(0.0, due - time.monotonic()))
                            due += gap
                        kind = kinds[(i + n) % len(kinds)]
                        path, data = hostile[kind]
                        n += 1
                        try:
                            r = c.post(url + path, content=data, headers={"Content-Type": "application/json"})
                            is_json = r.headers.get("content-type", "").startswith("application/json")
                            key = f"{kind}:{r.status_code}:{(r.json().get('error') or {}).get('code') if is_json else 'not-json'}"
                        except (httpx.TransportError, ValueError) as e:
                            key = f"{kind}:{type(e).__name__}"
                        with lock:
                            answers[key] = answers.get(key, 0) + 1

            threads = [threading.Thread(target=hostile_client, args=(i,), daemon=True) for i in range(n_fast)]
            threads += [threading.Thread(target=_slow_client, args=(port, stop, answers, lock), daemon=True)
                        for _ in range(n_slow)]
            for t in threads:
                t.start()
            time.sleep(2)
            n0 = sum(answers.values())
            c0, t0 = _cpu_by_process(sp.proc.pid), time.monotonic()
            flood, _ = valid_phase(args.flood_seconds)
            c1, wall = _cpu_by_process(sp.proc.pid), time.monotonic() - t0
            n1 = sum(answers.values())
            stop.set()
            for t in threads:
                t.join(60)
            res = {"hostile_rate_asked": rate or "unlimited",
                   "hostile_rate_served": round((n1 - n0) / wall, 1), **summary(flood)}
            q, f = out["quiet"]["p99_s"], res["p99_s"]
            res["p99_ratio"] = round(f / q, 2) if q and f else None
            res["targets_met"] = bool(res["success_rate"] == 1.0 and res["p99_ratio"] is not None
                                      and res["p99_ratio"] <= 3.0)
            res["cpu_cores"] = cores(c0, c1, wall)
            res["hostile_answers"] = dict(sorted(answers.items()))
            return res

        out["quiet_cpu_cores"] = cores(q0, q1, tq)
        out["machine_cores"] = os.cpu_count()
        out["by_rate"] = [flood_phase(r) for r in args.flood_rates]
        closed = next((r for r in out["by_rate"] if r["hostile_rate_asked"] == "unlimited"), None)
        if closed:  # the figure: hostile clients as fast as the server answers them
            out["flood"] = {k: closed[k] for k in ("requests", "ok", "success_rate", "p50_s", "p99_s", "statuses")}
            out["hostile_answers"], out["p99_ratio"] = closed["hostile_answers"], closed["p99_ratio"]
            out["targets_met"] = closed["targets_met"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", help="training model (a folder or 'default')")
    ap.add_argument("--serve-model", default="default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=20, help="trainer.checkpoint_every")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-flood", action="store_true")
    ap.add_argument("--flood-clients", type=int, default=32)
    ap.add_argument("--flood-seconds", type=float, default=60.0)
    ap.add_argument("--flood-rates", type=lambda v: [float(x) for x in v.split(",")], default=[0.0],
                    help="hostile requests/s in all, one flood per value; 0 = as fast as the server answers")
    args = ap.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_train:
            result["training"] = bench_training(args, Path(d))
        if not args.skip_serve:
            result["serving"] = bench_serving(args, Path(d))
        if not args.skip_flood:
            result["flood"] = bench_flood(args, Path(d))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

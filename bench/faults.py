"""What faults cost. Prints JSON.

Training: the same run on the built-in stdlib data, clean and with two worker processes killed
(SIGKILL, at a random moment after a checkpoint; ``trainer.max_failures=2``): the wall-time
overhead and the steps redone (progress lost between the last checkpoint and each kill).

Serving: ``negatron serve`` (the packaged model) under a 4-client load on ``/v1/embeddings``; the
Encoder replica process is killed: requests that failed (and how), and the time until every
request succeeds again. Then SIGTERM under the same load: what in-flight requests got.

    .venv/bin/python bench/faults.py [--model default] [--steps 100] [--skip-train] [--skip-serve]
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
    from negatron.serve.loadgen import tagged_pids
    from negatron.trainers.train import registered_steps, run_training

    data = tmp / "data"
    build_stdlib_dataset(data)
    ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=True)
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
    from negatron.serve.loadgen import Load, ServeProcess, free_port, replica_pids, summarize

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
    args = ap.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_train:
            result["training"] = bench_training(args, Path(d))
        if not args.skip_serve:
            result["serving"] = bench_serving(args, Path(d))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

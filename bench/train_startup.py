"""What a Ray Train run costs before and after its steps: a tiny model, 4 steps, one worker (and
two), on the embedded local Ray, timed from the driver and split into Ray Train's own phases (from
its controller's log in the Ray session folder). Prints JSON.

    .venv/bin/python bench/train_startup.py [--runs 3] [--workers 1,2] [--out FILE]

Phases, per run (seconds):
  driver_to_controller   run_training() called → the TrainController actor is up and has planned
                         the run (validation on the driver, the controller's process start and imports)
  worker_actors          the worker processes started (Ray's "worker actors created")
  train_context          torch.distributed set up on the workers ("Train context initialized")
  train_fn               the training function on the workers, steps included (model load: importing
                         transformers' model code is most of it; the 4 steps take ~0.2 s)
  after_workers          worker group shut down → fit() returned and final/, best/, metrics,
                         plot and model card written on the driver
The first run in a fresh Ray also pays for the first worker processes; it is reported, and the
mean is over the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _controller_events(session: Path, after: float) -> dict[str, float]:
    """Epoch times of the controller's phase lines, from the newest controller log written after ``after``."""
    logs = [p for p in (session / "logs" / "train").glob("ray-train-sys-controller-*.log") if p.stat().st_mtime >= after]
    if not logs:
        return {}
    marks = {"controller_up": "Requesting resources", "workers_created": "worker actors created",
             "context": "Train context initialized", "started": "Worker group startup completed",
             "shutdown": "Worker group shutdown successful"}
    out: dict[str, float] = {}
    for line in max(logs, key=lambda p: p.stat().st_mtime).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for name, text in marks.items():
            if name not in out and text in rec.get("message", ""):
                out[name] = datetime.strptime(rec["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="runs per worker count")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out")
    args = ap.parse_args()

    import ray

    from bench.emit import emit
    from negatron.cluster.config import load_config
    from negatron.cluster.local import init_local
    from negatron.trainers.train import run_training
    from tests.helpers import make_tiny_encoder, write_pairs

    result: dict = {"model": "tiny BERT (2 layers, hidden 32)", "steps": 4, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_tiny_encoder().save(tmp / "model")
        data = write_pairs(tmp / "pairs.parquet", n=64)
        t = time.time()
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        result["ray_init_s"] = round(time.time() - t, 2)
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        try:
            for workers in [int(w) for w in args.workers.split(",")]:
                rows = []
                for i in range(args.runs):
                    cfg = load_config(None, [
                        f"model.path={tmp / 'model'}", f"data.train={data}", "model.max_length=32",
                        f"trainer.num_workers={workers}", "trainer.cpus_per_worker=0.5", "trainer.batch_size=4",
                        "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.log_every_s=60",
                        f"run.storage_path={tmp / 'runs'}", f"run.name=w{workers}-{i}"])
                    t0 = time.time()
                    run_training(cfg)
                    t1 = time.time()
                    ev = _controller_events(session, t0)
                    row = {"total_s": round(t1 - t0, 2)}
                    if len(ev) == 5:
                        row.update({
                            "driver_to_controller": ev["controller_up"] - t0,
                            "worker_actors": ev["workers_created"] - ev["controller_up"],
                            "train_context": ev["context"] - ev["workers_created"],
                            "train_fn": ev["shutdown"] - ev["started"],
                            "after_workers": t1 - ev["shutdown"],
                        })
                        row = {k: round(v, 2) for k, v in row.items()}
                    rows.append(row)
                    print(f"[bench] {workers} worker(s), run {i}: {row}", file=sys.stderr, flush=True)
                rest = rows[1:] if workers == int(args.workers.split(",")[0]) and len(rows) > 1 else rows
                mean = {k: round(sum(r[k] for r in rest) / len(rest), 2) for k in rest[0] if all(k in r for r in rest)}
                result["runs"][f"{workers}_worker"] = {"each": rows, "mean_excluding_first_in_ray": mean}
        finally:
            ray.shutdown()
    emit(result, args.out)


if __name__ == "__main__":
    main()

"""Turn a Tune ResultGrid into what users read: a table, results.parquet, a plot, best.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from negatron.cluster.config import Config, dump_yaml


@dataclass
class TuneOutcome:
    """What ``negatron tune`` hands back: the experiment folder, one row per trial, the best
    trial's config (``best.yaml``) and checkpoint, and the plot."""

    experiment_dir: Path | str  # a local folder, or a URI on an object store
    rows: list[dict]
    best_config_path: Path | str | None
    best_checkpoint: str | None
    best_metric: float | None
    plot: Path | str | None


def _status(result, max_steps: int, tune_status: str | None) -> str:
    """ERROR | TERMINATED (trained to max_steps) | STOPPED_EARLY (by the scheduler) | INTERRUPTED."""
    if result.error is not None:
        return "ERROR"
    if tune_status in ("RUNNING", "PENDING", "PAUSED"):
        return "INTERRUPTED"
    step = (result.metrics or {}).get("step") or 0
    if step >= max_steps:
        return "TERMINATED"
    return "STOPPED_EARLY" if step > 0 else "INTERRUPTED"


def _trial_id_from_path(path: str) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return match.group(1) if match else Path(path).name


def _tune_statuses(grid) -> dict[str, str]:
    # Tune's own trial states are not public on ResultGrid; fall back to metrics when absent.
    try:
        return {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    except AttributeError:
        return {}


def _error_line(err: BaseException | None) -> str:
    if err is None:
        return ""
    from negatron.trainers.train import root_cause

    return root_cause(err)[:300]


def collect_rows(grid, cfg: Config) -> list[dict[str, Any]]:
    statuses = _tune_statuses(grid)
    rows = []
    for r in grid:
        m = r.metrics or {}
        conf = r.config or {}
        trial_id = m.get("trial_id") or _trial_id_from_path(r.path)
        row = {"trial_id": trial_id, "status": _status(r, cfg.trainer.max_steps, statuses.get(trial_id)),
               cfg.tune.metric: m.get(cfg.tune.metric), "step": m.get("step"),
               "reports": m.get("training_iteration", 0), "checkpoint_path": m.get("checkpoint_path"),
               "error": _error_line(r.error)}
        conf = {**conf, **(conf.get("preset") or {})}
        row.update({k: conf.get(k) for k in cfg.tune.space})
        rows.append(row)
    rows.sort(key=lambda x: x["trial_id"])
    return rows


def best_row(rows: list[dict], cfg: Config) -> dict | None:
    ok = [r for r in rows if r["status"] != "ERROR" and r[cfg.tune.metric] is not None]
    if not ok:
        return None
    sign = 1 if cfg.tune.mode == "max" else -1
    return max(ok, key=lambda r: sign * r[cfg.tune.metric])


def format_rows(rows: list[dict], cfg: Config) -> str:
    keys = list(cfg.tune.space)
    cols = ["trial_id", *keys, cfg.tune.metric, "step", "status"]
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    table = [[c for c in cols]] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    for r in rows:
        if r["error"]:
            lines.append(f"  {r['trial_id']} error: {r['error']}")
    return "\n".join(lines)


def write_parquet(rows: list[dict], path: Path | str) -> None:
    cols: dict[str, list] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for k in cols:
        vals = [r.get(k) for r in rows]
        if any(isinstance(v, (list, dict)) for v in vals) or len({type(v) for v in vals if v is not None}) > 1:
            vals = [None if v is None else str(v) for v in vals]
        cols[k] = vals
    import pyarrow.parquet as pq

    from negatron.cluster.storage import write_with

    write_with(path, lambda tmp: pq.write_table(pa.table(cols), tmp))  # temp file + rename, or one PUT


def plot_rows(rows: list[dict], cfg: Config, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cfg.tune.space)
    ok = [r for r in rows if r[cfg.tune.metric] is not None]
    if not ok or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        kind = next(iter(cfg.tune.space[key]))
        xs = [r[key] for r in ok]
        ys = [r[cfg.tune.metric] for r in ok]
        colors = ["tab:green" if r["status"] == "TERMINATED" else "tab:gray" for r in ok]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys, c=colors)
            if kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=colors)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(cfg.tune.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.run.name}: green = ran to the end, grey = stopped early")
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out


def summarize(grid, cfg: Config, exp_dir: Path | str) -> TuneOutcome:
    from negatron.cluster import storage

    rows = collect_rows(grid, cfg)
    for row in rows:  # Ray names a checkpoint on an object store without its scheme: make it a URI
        if row["checkpoint_path"]:
            row["checkpoint_path"] = storage.uri_on(exp_dir, row["checkpoint_path"])
    write_parquet(rows, storage.sub(exp_dir, "results.parquet"))
    plot = storage.sub(exp_dir, "tune.png")
    storage.write_with(plot, lambda tmp: plot_rows(rows, cfg, tmp))
    plot = plot if storage.is_file(plot) else None
    best = best_row(rows, cfg)
    best_path = best_ckpt = None
    if best is not None:
        overrides = {k: best[k] for k in cfg.tune.space}
        best_cfg = cfg.replace({**overrides, "run.name": f"{cfg.run.name}-best"})
        best_path = storage.sub(exp_dir, "best.yaml")
        storage.write_bytes(best_path, (f"# best trial {best['trial_id']}: {cfg.tune.metric} = "
                                        f"{best[cfg.tune.metric]}\n" + dump_yaml(best_cfg)).encode())
        # ASHA stops a trial at max_t before its driver exports final/: use the last checkpoint
        final = storage.sub(exp_dir, "trials", f"train-{best['trial_id']}", "final")
        best_ckpt = str(final) if storage.is_dir(final) else best["checkpoint_path"]
    return TuneOutcome(exp_dir, rows, best_path, best_ckpt, best[cfg.tune.metric] if best else None, plot)

"""The model card (``README.md``) a run writes into ``final/`` and ``best/``: what
sentence-transformers writes for its own trained models — Hub metadata, usage, the training setup,
dev (and, when known, test) metrics, the training plot and the full config.

``config_sentence_transformers.json`` (prompts, similarity function) is written by
``Encoder.save`` with every checkpoint, so it is already in both folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from negatron.cluster import storage

CARD = "README.md"
PLOT = "training.png"


def _base_model(path: str) -> str:
    return "sentence-transformers/all-MiniLM-L6-v2" if path == "default" else path


def _rows(d: dict[str, Any]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in d.items())


def _metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """{"dev (final)": {"mrr@10": ...}, ...} -> a Markdown table, one row per metric."""
    names = list(dict.fromkeys(k for c in columns.values() for k in c))
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    lines = []
    for n in names:
        cells = [f"{c[n]:.4f}" if isinstance(c.get(n), float) else str(c.get(n, "")) for c in columns.values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(lines)


def render(cfg: dict[str, Any], name: str, metrics: dict[str, dict[str, Any]], steps: int,
           with_plot: bool) -> str:
    """The card's Markdown. ``cfg``: the run's config as a dict; ``metrics``: column -> metrics."""
    from .tasks import TASKS

    m, t, kind = cfg["model"], cfg["trainer"], cfg["model"]["kind"]
    task = TASKS[kind]
    base = _base_model(m["path"])
    meta = {"library_name": task.card_meta["library_name"], "pipeline_tag": task.card_meta["pipeline_tag"],
            "tags": ["negatron", "contrastive", task.card_meta["tag"]],
            "base_model": base, "datasets": [storage.redact(cfg["data"]["train"])] if cfg["data"].get("train") else []}
    prompts = {r: m.get(f"{r}_prompt") for r in ("query", "document") if m.get(f"{r}_prompt")}
    setup = {
        "kind": kind, "base model": f"`{base}`", "training pairs": f"`{storage.redact(cfg['data'].get('train') or '')}`",
        "steps": steps, "workers × batch": f"{t['num_workers']} × {t['batch_size']} "
                                             f"(global {t['num_workers'] * t['batch_size']})",
        "learning rate": cfg["optim"]["lr"], "temperature": cfg["loss"].get("temperature"),
        "memory bank": f"{cfg['bank']['size']} ({cfg['bank'].get('mode', '')})" if cfg["bank"]["size"] else "none",
        "precision": t.get("precision", "fp32"),
        "mini-batch (cached loss)": t.get("mini_batch_size") or "off",
        "max length (query / text)": f"{m.get('query_max_length') or m['max_length']} / {m['max_length']}",
    }
    if prompts:
        setup["prompts"] = ", ".join(f"{r}: `{p!r}`" for r, p in prompts.items())
    link = "https://huggingface.co/" + base if m["path"] == "default" else base
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
           f"A {kind} fine-tuned from [`{base}`]({link}) with Negatron: data-parallel contrastive training on Ray "
           "with cross-worker in-batch negatives" + (" and a shared memory bank." if cfg["bank"]["size"] else "."),
           "", "## Usage", "", "```python", *task.card_usage, "```", "", task.card_serving]
    out += ["", "## Training", "", "| setting | value |", "|---|---|", _rows(setup), ""]
    if metrics:
        out += ["## Results", "", _metrics_table(metrics), ""]
    if with_plot:
        out += ["## Training curve", "", f"![loss and dev metric over steps]({PLOT})", ""]
    out += ["## Full config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(out)


def write_model_card(folder, cfg: dict[str, Any], name: str, metrics: dict[str, dict[str, Any]], steps: int,
                     plot: Path | None = None) -> None:
    """``README.md`` (and the plot beside it) into a model folder (local or on an object store)."""
    if plot is not None and Path(plot).is_file():
        storage.write_bytes(storage.sub(folder, PLOT), Path(plot).read_bytes())
    text = render(cfg, name, metrics, steps, with_plot=plot is not None and Path(plot).is_file())
    storage.write_bytes(storage.sub(folder, CARD), text.encode())


def dev_columns(metrics: dict[str, Any], best: dict[str, Any] | None = None,
                test: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The card's metric columns from ``metrics.json``-style dicts (numbers only)."""
    keep = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
                      and any(s in k for s in ("mrr", "ndcg", "recall", "map", "acc", "probe", "knn"))}
    cols = {}
    if metrics and keep(metrics):
        cols["dev (final)"] = keep(metrics)
    if best and keep(best):
        cols["dev (best)"] = keep(best)
    if test and keep(test):
        cols["test"] = keep(test)
    return cols

"""Test helpers: tiny models and tiny data, built locally."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_tiny_encoder(seed: int = 0, hidden: int = 32, layers: int = 2, **kwargs):
    import torch
    from transformers import AutoTokenizer, BertConfig

    from negatron.trainers.encoder import Encoder, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=256)
    torch.manual_seed(seed)
    kwargs.setdefault("max_length", 64)
    return Encoder.from_config(cfg, tok, **kwargs)


def write_pairs(path: Path, n: int = 64, with_negatives: bool = False) -> Path:
    cols = {
        "query": [f"what does function number {i} compute for {i % 7}" for i in range(n)],
        "positive": [f"def f{i}(x):\n    return x * {i} + {i % 5}" for i in range(n)],
        "query_id": [f"q{i}" for i in range(n)],
        "positive_id": [f"d{i}" for i in range(n)],
    }
    if with_negatives:
        cols["negatives"] = [[f"def g{i}(y):\n    return y - {i}"] for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def write_synthetic_task(folder: Path, n_train: int = 200, n_dev: int = 40, n_distract: int = 40) -> Path:
    """A learnable toy retrieval task: query 'number i' ↔ doc 'f{i}'; a tiny model learns it fast."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]

    def q(i):
        return f"find the helper for {words[i % 8]} item {i}"

    def d(i):
        return f"def helper_{i}(x):\n    # {words[i % 8]} {i}\n    return x + {i}"

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query": [q(i) for i in range(n_train)], "positive": [d(i) for i in range(n_train)],
                             "query_id": [f"q{i}" for i in range(n_train)],
                             "positive_id": [f"d{i}" for i in range(n_train)]}), folder / "train.parquet")
    dev = folder / "dev"
    dev.mkdir(exist_ok=True)
    ids = range(n_train, n_train + n_dev)
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in ids], "text": [q(i) for i in ids]}), dev / "queries.parquet")
    docs = range(n_train, n_train + n_dev + n_distract)
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in docs], "text": [d(i) for i in docs]}), dev / "corpus.parquet")
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in ids], "doc_id": [f"d{i}" for i in ids],
                             "score": [1] * n_dev}), dev / "qrels.parquet")
    return folder


def make_tiny_cross_encoder(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny BERT sequence classifier (1 label) with the packaged MiniLM tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from negatron.trainers.encoder import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_labels=1,
                     num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.model_max_length = 128
    tok.save_pretrained(folder)
    return Path(folder)


def wait_for_port(port: int, proc, timeout_s: float, what: str) -> None:
    """Return once something listens on 127.0.0.1:``port``; fail if ``proc`` exits or time runs out."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start listening on port {port} (exit code {proc.poll()})")
            time.sleep(0.2)

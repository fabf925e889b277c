"""ONNX Runtime backend for serving encoders and rerankers (``serve.encoder.backend: onnx``,
``negatron export``).

- **Export**: the torch model (pooling, projection and normalisation included for a bi-encoder;
  the relevance logit for a cross-encoder) through ``torch.onnx.export`` (torch is pinned, so the
  exporter is), with dynamic batch and sequence axes. The folder holds ``model.onnx``, the
  tokenizer, the prompts and ``negatron_onnx.json`` (the torch model's content id, kind, variant).
- **Cache**: beside the model, ``<model>/onnx/<variant>/`` (the model's content id ignores it),
  or under the local cache when the model folder is read-only; a folder built from another
  version of the model is rebuilt.
- **int8**: dynamic quantization of the MatMul weights, per output channel
  (``onnxruntime.quantization.quantize_dynamic``),
  accepted only when it keeps quality: dev MRR@10 within ``MAX_MRR_DROP`` of fp32 when a dev set
  is given, else mean cosine to the fp32 embeddings ≥ ``MIN_COSINE`` on calibration texts.
- ``OnnxEncoder`` / ``OnnxCrossEncoder`` have the torch classes' ``encode`` / ``score``, so the
  server, ``negatron eval`` and the quality check use them unchanged.

Extras: ``pip install 'negatron[onnx]'`` (onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from negatron.cluster.config import ConfigError

from .encoder import TextInput, encode_sorted
from .model_io import model_id, read_prompts, resolve_model_path

META = "negatron_onnx.json"
ONNX_DIR = "onnx"
FORMAT = 2  # exports of another format are redone
MAX_MRR_DROP = 0.005
MIN_COSINE = 0.99
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# what an export holds (from the model's architecture): embeddings, or a relevance logit per pair
EMBEDDER, RERANKER = "embedder", "reranker"


class QuantizationRefused(ConfigError):
    """int8 lost too much quality against fp32 (the message has the numbers)."""


def require() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("the onnx backend needs onnxruntime: pip install 'negatron[onnx]'") from None


def _kind(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    archs = cfg.get("architectures") or []
    return RERANKER if any("SequenceClassification" in a for a in archs) else EMBEDDER


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".negatron-write-test"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def cache_dir(folder: Path, variant: str) -> Path:
    """Where the ONNX export of ``folder`` lives: beside it, or in the local cache if read-only."""
    beside = folder / ONNX_DIR / variant
    if _writable(beside.parent):
        return beside
    from negatron.cluster.storage import cache_root

    return cache_root() / "onnx" / f"{model_id(folder)}-{variant}"


def _read_meta(out: Path) -> dict:
    try:
        return json.loads((out / META).read_text())
    except (OSError, ValueError):
        return {}


def export(model: str | Path, quantize: str = "none", out: Path | None = None, log=print) -> Path:
    """The ONNX folder of ``model`` (a bi-encoder or cross-encoder folder), exported if missing or
    stale; ``quantize``: "none" or "int8" (quantized from the fp32 export). Returns the folder."""
    require()
    if quantize not in ("none", "int8"):
        raise ConfigError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    folder = resolve_model_path(str(model))
    variant = "int8" if quantize == "int8" else "fp32"
    dest = Path(out) if out is not None else cache_dir(folder, variant)
    mid = model_id(folder)
    meta = _read_meta(dest)
    if (meta.get("model_id") == mid and meta.get("variant") == variant and meta.get("format") == FORMAT
            and (dest / "model.onnx").is_file()):
        return dest
    if variant == "int8":
        fp32 = export(folder, "none", log=log)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / "int8"
            shutil.copytree(fp32, stage, ignore=shutil.ignore_patterns("model.onnx", META))
            # per-channel int8 weights of the MatMuls: per-tensor scales lost too much here
            # (all-MiniLM-L6-v2: mean cosine to fp32 0.954 per tensor, 0.993 per channel)
            quantize_dynamic(str(fp32 / "model.onnx"), str(stage / "model.onnx"), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"])
            meta = {**_read_meta(fp32), "variant": "int8"}
            (stage / META).write_text(json.dumps(meta, indent=2))
            _swap_in(stage, dest)
        log(f"onnx: quantized {folder.name} to int8 in {dest}")
        return dest
    kind = _kind(folder)
    log(f"onnx: exporting {folder.name} ({kind}) to {dest}")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "fp32"
        stage.mkdir()
        meta = _export_fp32(folder, kind, stage)
        meta.update({"format": FORMAT, "model_id": mid, "variant": "fp32", "kind": kind, "source": str(folder)})
        (stage / META).write_text(json.dumps(meta, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _swap_in(stage, dest)
    return dest


def _swap_in(stage: Path, dest: Path) -> None:
    """Replace ``dest`` by ``stage`` (copied beside it first, so a crash leaves the old one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(stage, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _export_fp32(folder: Path, kind: str, stage: Path) -> dict:
    import torch

    if kind == RERANKER:
        from .cross_encoder import CrossEncoder

        model = CrossEncoder.from_pretrained(folder).eval()
        inner = model.model

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                out = self.m(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).logits.float()  # N×labels
                return out[:, 0] if out.shape[1] == 1 else out[:, 1] - out[:, 0]  # N

        sample = model.tokenizer(["a query"], ["a text to score"], return_tensors="pt")
        meta = {"max_length": model.max_length}
        tokenizer = model.tokenizer
        output = "logit"
    else:
        from .encoder import Encoder

        model = Encoder.from_pretrained(str(folder)).eval()
        enc = model

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = enc

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

        sample = model.tokenizer(["a text", "another text"], padding=True, return_tensors="pt")
        meta = {"max_length": model.max_length, "dim": model.dim, "prompts": model.prompts,
                "normalize": model.normalize}
        tokenizer = model.tokenizer
        output = "sentence_embedding"
    if "token_type_ids" not in sample:  # models without segment ids get zeros
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {0: batch, 1: seq}
    import contextlib
    import io
    import warnings

    # the exporter narrates each stage on stdout and warns about axis names: keep the user's terminal quiet
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap().eval(), tuple(sample[k] for k in INPUTS), str(stage / "model.onnx"),
                          input_names=list(INPUTS), output_names=[output], dynamo=True,
                          dynamic_shapes=(dims, dims, dims), external_data=False, verbose=False)
    tokenizer.save_pretrained(stage)
    meta.update({"torch": torch.__version__.split("+")[0], "output": output})
    return meta


def _session(folder: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feeds(batch: dict, names: set[str]) -> dict[str, np.ndarray]:
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in batch.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


class OnnxEncoder(TextInput):
    """A bi-encoder on ONNX Runtime with ``Encoder``'s ``encode`` (prompts, length-sorted passes)."""

    def __init__(self, folder: str | Path, threads: int = 1):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        if self.meta.get("kind") != EMBEDDER:
            raise ConfigError(f"{folder}: not an ONNX bi-encoder export ({META} says {self.meta.get('kind')!r})")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.max_length = int(self.meta["max_length"])
        self.dim = int(self.meta["dim"])
        self.normalize = bool(self.meta.get("normalize", True))
        self.prompts = dict(self.meta.get("prompts") or read_prompts(self.folder))
        self.session = _session(self.folder, threads)
        self._names = {i.name for i in self.session.get_inputs()}

    def eval(self) -> "OnnxEncoder":  # the torch classes' interface
        return self

    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
               progress: str | None = None, stats: dict | None = None, role: str | None = None) -> np.ndarray:
        def forward(batch) -> np.ndarray:
            return self.session.run(None, _feeds({k: v.numpy() for k, v in batch.items()}, self._names))[0]

        return encode_sorted(self, self.prompted(texts, role), batch_size, max_length, forward, progress, stats)


class OnnxCrossEncoder:
    """A cross-encoder on ONNX Runtime with ``CrossEncoder.score``."""

    def __init__(self, folder: str | Path, threads: int = 1, max_length: int | None = None):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        if self.meta.get("kind") != RERANKER:
            raise ConfigError(f"{folder}: not an ONNX cross-encoder export ({META} says {self.meta.get('kind')!r})")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.max_length = max_length or int(self.meta["max_length"])
        self.session = _session(self.folder, threads)
        self._names = {i.name for i in self.session.get_inputs()}

    def eval(self) -> "OnnxCrossEncoder":
        return self

    def score(self, queries: Sequence[str], texts: Sequence[str], chunk_size: int = 32,
              max_length: int | None = None, raw: bool = False) -> np.ndarray:
        from .cross_encoder import score_sorted

        def logits(q: list[str], t: list[str]) -> np.ndarray:
            batch = self.tokenizer(q, t, padding=True, truncation=True, max_length=max_length or self.max_length,
                                   return_tensors="np")
            return self.session.run(None, _feeds(dict(batch), self._names))[0]  # b

        return score_sorted(queries, texts, chunk_size, raw, logits)


def calibration_texts(n: int = 256) -> list[str]:
    """Deterministic texts for the int8 check when there is no dev set: docstrings of public
    functions of a few standard-library modules (the code-search domain of the built-in data)."""
    import importlib
    import inspect

    out: list[str] = []
    for name in ("json", "os.path", "textwrap", "collections", "functools", "itertools", "re", "string",
                 "statistics", "pathlib", "shutil", "csv", "base64", "difflib", "heapq", "bisect"):
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = inspect.getdoc(obj) if not attr.startswith("_") and callable(obj) else None
            if doc and doc not in out:
                out.append(doc[:1000])
            if len(out) >= n:
                return out
    return out


def check_int8(model: str | Path, int8: OnnxEncoder, dev: str | None = None, log=print) -> dict:
    """Quality of the int8 export against the fp32 torch model; raises ``QuantizationRefused``
    (with the numbers) when it drops too much. Returns the numbers."""
    from .encoder import Encoder

    fp32 = Encoder.from_pretrained(str(model)).eval()
    if dev:
        from .evaluate import evaluate_encoder

        a = evaluate_encoder(fp32, dev, progress=False)
        b = evaluate_encoder(int8, dev, progress=False)
        res = {"check": "dev", "mrr@10_fp32": round(a["mrr@10"], 4), "mrr@10_int8": round(b["mrr@10"], 4),
               "mrr@10_change": round(b["mrr@10"] - a["mrr@10"], 4)}
        log(f"int8 check on {dev}: dev MRR@10 {res['mrr@10_fp32']:.4f} (fp32) -> {res['mrr@10_int8']:.4f} (int8)")
        if a["mrr@10"] - b["mrr@10"] > MAX_MRR_DROP:
            raise QuantizationRefused(
                f"int8 refused: dev MRR@10 drops from {a['mrr@10']:.4f} (fp32) to {b['mrr@10']:.4f} (int8), "
                f"more than {MAX_MRR_DROP}; serve fp32 (quantize: none)")
        return res
    texts = calibration_texts()
    e32 = fp32.encode(texts, role="document")
    e8 = int8.encode(texts, role="document")
    cos = (e32 * e8).sum(1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1) + 1e-12)
    res = {"check": "cosine", "texts": len(texts), "cosine_mean": round(float(cos.mean()), 4),
           "cosine_min": round(float(cos.min()), 4)}
    log(f"int8 check on {len(texts)} calibration texts: cosine to fp32 mean {res['cosine_mean']:.4f}, "
        f"min {res['cosine_min']:.4f}")
    if cos.mean() < MIN_COSINE:
        raise QuantizationRefused(
            f"int8 refused: mean cosine to the fp32 embeddings is {cos.mean():.4f} (min {cos.min():.4f}) on "
            f"{len(texts)} calibration texts, below {MIN_COSINE}; serve fp32 (quantize: none), or give a dev "
            "set to judge by MRR@10 instead")
    return res


def prepare(model: str | Path, quantize: str = "none", dev: str | None = None, out: Path | None = None,
            log=print) -> tuple[Path, dict]:
    """Export (and for int8, check) ``model``; returns the ONNX folder and the check's numbers.
    The check's verdict is kept in the folder, so replicas and restarts do not repeat it."""
    dest = export(model, quantize, out=out, log=log)
    if quantize != "int8" or _kind(resolve_model_path(str(model))) != EMBEDDER:
        return dest, {}
    meta = _read_meta(dest)
    key = f"check:{dev or 'cosine'}"
    if key not in meta.get("checks", {}):
        res = check_int8(model, OnnxEncoder(dest), dev, log=log)  # raises when refused
        meta.setdefault("checks", {})[key] = res
        (dest / META).write_text(json.dumps(meta, indent=2))
    return dest, meta["checks"][key]


def load(model: str | Path, quantize: str = "none", threads: int = 1, max_length: int | None = None):
    """``OnnxEncoder`` or ``OnnxCrossEncoder`` of a model folder (exported when not cached)."""
    dest = export(model, quantize, log=lambda s: None)
    kind = _read_meta(dest).get("kind")
    return OnnxCrossEncoder(dest, threads, max_length) if kind == RERANKER else OnnxEncoder(dest, threads)

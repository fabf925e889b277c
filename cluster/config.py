"""One YAML file plus ``a.b=value`` overrides, validated once on the driver.

The config is a tree of frozen pydantic models. Unknown keys, wrong types and out-of-range values
raise :class:`ConfigError` with a message naming the dotted key, the value and what is allowed.
Workers receive ``cfg.to_dict()`` (plain JSON types) and rebuild it with ``Config.from_dict``;
the round trip is exact.
"""

from __future__ import annotations

import copy
import re
import reprlib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .errors import NegatronError
from .serve_config import ServeSection


class ConfigError(NegatronError, ValueError):
    """A config file, override or value is invalid. The message names the key."""


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` pass every `gt=0` bound and fail late inside Ray
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # numpy's and torch's seeding both take it; larger ones fail inside the workers


class DataConfig(_Section):
    """Training and evaluation data: a pairs Parquet file and eval folders (docs/data.md has the schemas)."""

    train: Optional[str] = Field(None, description=(
        "Pairs Parquet (a file, a folder of files or a URI prefix): query, positive, query_id, positive_id "
        "[, negatives, negative_ids]."))
    dev: Optional[str] = Field(None, description="Eval folder (queries/corpus/qrels.parquet) used during training.")
    test: Optional[str] = Field(None, description="Eval folder used by the quickstart's before/after table.")
    max_dev_queries: int = Field(1000, ge=0, description=(
        "Dev checks during training use at most this many judged dev queries, a seeded sample (0 = all)."))
    max_dev_docs: int = Field(20000, ge=0, description=(
        "Dev checks during training embed at most this many documents: the judged documents of the kept "
        "queries plus a seeded sample of the others (0 = the whole dev corpus; `negatron eval` scores it all)."))
    shuffle_rows: int = Field(65536, ge=1, description=(
        "Rows per shuffle window of the streamed training table: a table up to this size is fully "
        "permuted each epoch; a larger one is read a row group at a time, its row groups in a seeded "
        "order and rows shuffled within windows of this many rows (a worker holds about two windows)."))
    num_negatives: int = Field(1, ge=0, le=64, description="Hard negatives per row taken from a 'negatives' column (0 = ignore it).")
    negatives_corpus: str = Field("", description=(
        "Where the texts of hard negatives stored as ids only (a 'negative_ids' column without 'negatives', "
        "what `negatron mine` writes) are looked up: a corpus Parquet (doc_id, text) or an index artifact "
        "(memory-mapped)."))
    in_batch_negatives: int = Field(0, ge=0, le=64, description=(
        "Cross-encoder: other rows' positives from the worker's batch added to each query's group "
        "(easy negatives next to the hard ones)."))
    hard_negatives_after: int = Field(0, ge=0, description=(
        "Cross-encoder: steps trained on in-batch negatives only before the hard negatives join "
        "(a fresh scoring head learns easy pairs first)."))


class ModelConfig(_Section):
    """The model trained: its starting weights, kind and shape."""

    path: str = Field("default", min_length=1, description="Hugging Face folder, or 'default' for the packaged all-MiniLM-L6-v2.")
    kind: Literal["bi-encoder", "cross-encoder", "image"] = Field("bi-encoder", description="What is trained: a bi-encoder (text embeddings), a cross-encoder (reranker) or an image encoder.")
    pooling: Literal["mean", "cls"] = Field("mean", description="Token pooling of a bi-encoder: mean of the token vectors, or the [CLS] vector.")
    projection_dim: int = Field(0, ge=0, description="Add a linear projection head of this size (0 = none).")
    normalize: bool = Field(True, description="L2-normalise embeddings (cosine similarity).")
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute the transformer's activations during backward instead of keeping them: less memory for "
        "a larger batch, about a third more compute (text encoders and cross-encoders)."))
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text (longer texts are truncated).")
    query_max_length: int = Field(0, ge=0, le=8192, description="Query-side max length (0 = model.max_length).")
    query_prompt: str = Field("", max_length=512, description=(
        "Text put in front of every query in training, evaluation, mining and serving (e.g. 'query: '); saved "
        "with the checkpoint (config_sentence_transformers.json), so serving uses the same. Empty = the starting "
        "model's own prompt, if it has one."))
    document_prompt: str = Field("", max_length=512, description=(
        "Text put in front of every document (positives, negatives, corpora), e.g. 'passage: '; saved like "
        "model.query_prompt. Empty = the starting model's own."))
    image_size: int = Field(16, ge=4, le=512, description="kind image: inputs are resized to this square size.")
    image_channels: Literal[1, 3] = Field(1, description="kind image: 1 (grey) or 3 (RGB) input channels.")
    image_width: int = Field(32, ge=4, le=512, description="kind image: channels of the CNN's first stage.")


class TrainerConfig(_Section):
    """Ray Train: workers, steps, checkpoints."""

    num_workers: int = Field(2, ge=1, le=1024, description="Ray Train workers (data-parallel processes).")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs per worker (fractional on small machines).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    batch_size: int = Field(16, ge=1, description="Per-worker batch size.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of the run.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed (-1 = unlimited).")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint (and evaluate on data.dev) every N steps and at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (the latest is always kept).")
    log_every_s: float = Field(5.0, gt=0, description="Seconds between progress lines.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of data order, augmentation and initialisation (the same seed gives the same run).")
    placement: Literal["pack", "spread"] = Field("pack", description="Ray placement of the workers: pack onto few nodes, or spread across nodes.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker.")
    mini_batch_size: int = Field(0, ge=0, description=(
        "> 0: the cached contrastive step (GradCache): the batch is embedded without gradients, the loss "
        "(cross-worker negatives, bank, hard negatives) computed once, then re-encoded with gradients this many "
        "texts at a time — the same gradients as one pass, with the activation memory of one mini-batch. "
        "0 = one pass over the whole batch."))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "Precision of the encoder's forward and backward: fp32, or autocast to bf16 / fp16 (the loss, bank, "
        "gathers and momentum update stay fp32; fp16 adds a gradient scaler). bf16 runs on CPUs too."))
    allow_tf32: bool = Field(True, description="GPUs: allow TF32 matmuls for fp32 work (Ampere and later).")
    collective_timeout_s: int = Field(1800, ge=10, le=86400, description=(
        "Seconds a worker waits in a collective (gradient all-reduce, gathers, a shared dev check) "
        "for the others before the run stops with an error naming it (the torch process group's timeout)."))


class OptimConfig(_Section):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(2e-5, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    schedule: Literal["constant", "linear"] = Field("linear", description="Learning rate after warm-up: constant, or linear decay to 0 at max_steps.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = no clipping).")
    temperature_lr: float = Field(0.0, ge=0, le=1.0, description=(
        "Learning rate of a learnable temperature (0 = optim.lr); τ is a single log-parameter that "
        "barely moves at an encoder's learning rate."))
    head_lr: float = Field(0.0, ge=0, le=1.0, description=(
        "Cross-encoder: learning rate of the scoring head (pooler + classifier), which starts fresh "
        "from a bi-encoder (0 = optim.lr)."))


class LossConfig(_Section):
    """InfoNCE: temperature and which negatives count."""

    temperature: float = Field(0.05, gt=0, le=10.0, description="InfoNCE softmax temperature (the initial value when learnable).")
    learnable_temperature: bool = Field(False, description="Learn the temperature (CLIP-style log-parameter), clamped at min_temperature.")
    min_temperature: float = Field(0.01, gt=0, description=(
        "Lower bound of a learnable temperature (the stored value is clamped after each step)."))
    symmetric: bool = Field(False, description="Add the positive-to-query direction of InfoNCE (CLIP-style).")
    cross_worker_negatives: bool = Field(True, description="Gather every worker's keys as negatives (global batch); off: each worker's own batch only.")
    guide_model: str = Field("", description=(
        "GISTEmbed: a frozen bi-encoder ('default' = the packaged all-MiniLM-L6-v2, or a model folder) that "
        "embeds each batch's queries, positives and hard negatives without gradient; an in-batch, hard or bank "
        "candidate it scores above the query's positive (minus loss.guide_margin) is masked as a likely false "
        "negative. Costs one extra forward pass per text. Empty = off (bi-encoder training)."))
    guide_margin: float = Field(0.0, ge=0.0, le=2.0, description=(
        "GISTEmbed: mask candidates the guide scores above (its score of the positive − this margin)."))

    @model_validator(mode="after")
    def _check_clamp(self) -> "LossConfig":
        if self.learnable_temperature and self.temperature < self.min_temperature:
            raise ValueError(
                f"temperature {self.temperature} is below min_temperature {self.min_temperature}"
            )
        return self


class BankConfig(_Section):
    """The shared cross-worker negative memory bank (a MoCo-style queue, identical on every worker)."""

    size: int = Field(0, ge=0, le=1 << 22, description=(
        "Memory bank slots K (0 = no bank; at most 4,194,304: K × dim × 4 bytes live on every worker)."))
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="EMA key encoder momentum (0 = keys from the live encoder, detached).")
    max_age: int = Field(0, ge=0, description="Ignore bank entries older than this many steps (0 = no limit).")
    mode: Literal["joint", "moco"] = Field("moco", description=(
        "joint: bank keys join the in-batch softmax; moco: a separate softmax whose positive is the "
        "key encoder's embedding of the positive (consistent with the bank keys)"))
    weight: Optional[float] = Field(None, ge=0.0, description=(
        "moco mode: null averages the in-batch and bank terms; a number w makes the loss "
        "in-batch + w × bank (with AdamW only the ratio matters: w = 1 equals the mean)."))
    filter_ratio: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Mask bank keys scoring above this × the positive's score as likely false negatives (0 = off)."))
    prefill: bool = Field(False, description=(
        "Fill the bank before the first step with keys of up to bank.size training positives (a "
        "seeded sample; forward passes, no gradient), so it starts full instead of filling over the "
        "first size / global-batch steps. Text encoders; skipped on resume (the bank is restored)."))


class AugmentConfig(_Section):
    """Views of a pair: text augmentations, or image transforms for kind image."""

    apply_to: Literal["query", "positive", "both"] = Field("query", description="Which side of each pair the text augmentations change.")
    mask_prob: float = Field(0.0, ge=0.0, le=0.9, description="Probability of masking each token.")
    delete_prob: float = Field(0.0, ge=0.0, le=0.9, description="Probability of deleting each token.")
    crop: bool = Field(False, description="Keep a random contiguous span of each text.")
    crop_min_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Smallest kept fraction of a cropped text.")
    dropout_views: bool = Field(False, description="SimCSE: the query is the positive text itself; dropout makes the two views differ.")
    strength: float = Field(0.5, ge=0.0, le=1.0, description="kind image: sets every image transform at once.")
    image_crop_min: Optional[float] = Field(None, ge=0.05, le=1.0, description="Random resized crop: smallest area fraction.")
    image_flip: Optional[float] = Field(None, ge=0.0, le=1.0, description="Horizontal flip probability (default 0).")
    image_brightness: Optional[float] = Field(None, ge=0.0, le=1.0, description="Brightness jitter (fraction of the range; default from strength).")
    image_contrast: Optional[float] = Field(None, ge=0.0, le=1.0, description="Contrast jitter (fraction; default from strength).")
    image_noise: Optional[float] = Field(None, ge=0.0, le=1.0, description="Gaussian noise std (pixels in 0..1).")
    image_blur: Optional[float] = Field(None, ge=0.0, le=1.0, description="Probability of a 3x3 gaussian blur.")


class RunConfig(_Section):
    """Where a run writes: `<storage_path>/<name>/`."""

    name: str = Field("negatron", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$", description=(
        "The run folder's name under storage_path: one path component (not '.' or '..')."))
    storage_path: str = Field("runs", min_length=1, description=(
        "Folder or object-store URI (s3://bucket/prefix[?endpoint_override=host:port&scheme=http], gs://, "
        "abfs://, hdfs://, file://) that holds the run folders and Ray's checkpoints."))
    tracking: Literal["none", "tensorboard", "mlflow"] = Field("none", description=(
        "Rank 0 logs loss, τ, samples/s, learning rate, bank fill, the bank entries' mean age, the share of bank "
        "entries masked as false negatives and the dev metrics to TensorBoard event files (<run>/tensorboard) "
        "or an MLflow run (<run>/mlruns, or run.tracking_uri); needs pip install 'negatron[tracking]'."))
    tracking_uri: str = Field("", description=(
        "run.tracking: mlflow: an MLflow tracking server (e.g. http://mlflow:5000); empty = a file store in the "
        "run folder."))

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        if v in (".", ".."):
            raise ValueError(f"run.name {v!r} is not a folder name: the run folder would be the storage "
                             "folder itself or its parent (give a name such as 'quickstart')")
        return v


class EvalConfig(_Section):
    """Dev and test evaluation (MRR@10, nDCG@10, recall@k; k-NN accuracy for images)."""

    batch_size: int = Field(64, ge=1, description="Texts per forward pass when embedding queries and corpus.")
    top_k: int = Field(100, ge=1, description="Documents retrieved per query for the ranking metrics.")
    first_stage: str = Field("default", min_length=1, description=(
        "Cross-encoder training: the bi-encoder whose top rerank_depth dev candidates the reranker reorders."))
    rerank_depth: int = Field(20, ge=1, le=1000, description="Cross-encoder dev checks: candidates reranked per query.")
    knn_k: int = Field(20, ge=1, description="Image models: neighbours of the k-NN accuracy.")
    probe_shots: int = Field(5, ge=0, description="Image models: labelled images per class of the few-shot probe (0 = off).")


_DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


class TuneSection(_Section):
    """`negatron tune`: the search space, the scheduler and the trials."""

    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "dotted config key -> {loguniform|uniform|randint: [low, high]} or {choice|grid: [values]}"))
    num_samples: int = Field(8, ge=1, description="Trials (configurations sampled from tune.space).")
    metric: str = Field("dev_mrr@10", pattern=r"^dev_[a-z0-9@_]+$", description="Dev metric the search optimises (a key of metrics.json).")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower metric is better.")
    scheduler: Literal["asha", "pbt", "fifo"] = Field("asha", description="Early stopping: ASHA, population-based training, or none (fifo).")
    search: Literal["random", "optuna"] = Field("random", description="How trials are sampled: at random, or by Optuna's TPE (pip install negatron[optuna]).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials that run at once.")
    grace_period: int = Field(1, ge=1, description="ASHA: reports (checkpoints) before a trial can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: 1/reduction_factor of the trials go on at each rung.")
    asha_recheck: bool = Field(True, description=(
        "ASHA: when a later trial reaches a rung, stop running trials no longer in its top "
        "1/reduction_factor (Ray's ASHA promotes first arrivals unconditionally)."))
    perturbation_interval: int = Field(2, ge=1, description="PBT: reports between exploit/explore.")
    trial_cpus: float = Field(0.1, gt=0, description="CPU share of each trial's driver.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the search (which configurations are sampled).")

    @model_validator(mode="after")
    def _check_space(self) -> "TuneSection":
        for key, spec in self.space.items():
            if key.startswith(("run.", "tune.", "serve.")) or key not in all_keys():
                raise ValueError(f"space key {key!r} is not a searchable config key")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
                raise ValueError(f"space[{key!r}]: expected one of {sorted(_DISTRIBUTIONS)} "
                                 f"(e.g. {{loguniform: [0.01, 0.5]}}), got {spec!r}")
            kind, arg = next(iter(spec.items()))
            n = _DISTRIBUTIONS[kind]
            if not isinstance(arg, list) or (n and len(arg) != n) or not arg:
                want = "[low, high]" if n else "a non-empty list of values"
                raise ValueError(f"space[{key!r}].{kind}: expected {want}, got {arg!r}")
            if n and not arg[0] < arg[1]:
                raise ValueError(f"space[{key!r}].{kind}: low {arg[0]!r} must be below high {arg[1]!r}")
            if kind == "loguniform" and arg[0] <= 0:
                raise ValueError(f"space[{key!r}].loguniform: low must be > 0, got {arg[0]!r}")
        return self


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    bank: BankConfig = BankConfig()
    augment: AugmentConfig = AugmentConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneSection = TuneSection()
    serve: ServeSection = ServeSection()

    @model_validator(mode="after")
    def _check_kind(self) -> "Config":
        if self.model.kind == "cross-encoder":
            if self.bank.size:
                raise ValueError(f"bank.size is {self.bank.size}: the memory bank is for bi-encoders; "
                                 "a cross-encoder trains on hard negatives (set bank.size: 0)")
            if self.model.projection_dim:
                raise ValueError("model.projection_dim: a cross-encoder has no projection head (set 0)")
        if self.model.kind != "bi-encoder":
            for key in ("query_prompt", "document_prompt"):
                if getattr(self.model, key):
                    raise ValueError(f"model.{key} is for bi-encoders (text embeddings); a {self.model.kind} "
                                     "has no query/document roles (leave it empty)")
        if self.loss.guide_model and self.model.kind != "bi-encoder":
            raise ValueError(f"loss.guide_model is for bi-encoders (GISTEmbed); a {self.model.kind} run has no "
                             "guide (leave it empty)")
        if self.bank.prefill and self.model.kind == "image":
            raise ValueError("bank.prefill is for text encoders; an image run's bank fills as it trains "
                             "(set bank.prefill: false)")
        return self

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> "Config":
        """A URI anywhere in the config (data, model, storage, serve paths) carries no secret: the
        config is printed, saved with runs and shipped to workers."""
        from .storage import check_uri

        def walk(value: Any, key: str) -> None:
            if isinstance(value, str):
                check_uri(value, key)
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{key}.{k}" if key else str(k))
            elif isinstance(value, list):
                for v in value:
                    walk(v, key)

        walk(self.model_dump(mode="json"), "")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (what Ray workers receive)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        """Validate a nested dict. Raises ConfigError naming the bad key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, source)) from None

    def replace(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """A new config with dotted overrides applied (validated)."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
        for key, value in items:
            set_dotted(data, key, value)
        return Config.from_dict(data, source="overrides")


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key (allowed here: {', '.join(allowed)})"
            lines.append(f"{source}: {key}: {msg}")
            continue
        if err["type"] == "value_error":  # from a cross-field validator: the message names the value
            where = f"{key}: " if err["loc"] else ""  # a whole-config check names its key itself
            lines.append(f"{source}: {where}{msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"{source}: {key}: {msg} (got {short_repr(err.get('input'))})")
    return "invalid config:\n  " + "\n  ".join(lines[:20]) + (
        f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 3


def short_repr(value: Any) -> str:
    """repr() cut to a line: an error message never grows with the value it quotes."""
    return _SHORT.repr(value)


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'loss.temperature', 'serve.encoder.scale.max_replicas'."""
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    for name, field in Config.model_fields.items():
        walk(field.annotation, f"{name}.")
    return out


MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_NODES = 20_000  # a config has a few hundred; an alias bomb expands to millions


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2), not the string PyYAML's 1.1 rules give,
    refuses a key given twice in one mapping (PyYAML silently keeps the last), and refuses
    documents whose aliases expand past ``MAX_YAML_NODES`` nodes (the "billion laughs")."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)} (first at line {seen[key].line + 1}); "
                        "the first value would be silently lost", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root) -> None:
    """Count nodes as the constructor would visit them (aliases expanded); stop at the budget."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_NODES} nodes through "
                                 "anchors and aliases; a Negatron config needs far fewer (alias bomb?)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# free text where YAML would turn "query: " into a mapping: the override's value is taken as written
RAW_TEXT_KEYS = ("model.query_prompt", "model.document_prompt")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value); the value is parsed as YAML (so 0.1, true, [1, 2] work),
    except for the free-text keys in ``RAW_TEXT_KEYS`` (``model.query_prompt=query: ``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. loss.temperature=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    if key in RAW_TEXT_KEYS:
        return key, raw
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {short_repr(raw)}: {str(e)[:300]}") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for key 'a.b'; an unknown key is a ConfigError."""
    parts = key.split(".")
    valid = set(all_keys())
    if key not in valid:
        close = [k for k in valid if k.split(".")[-1] == parts[-1]]
        hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _read_config_file(path: str | Path) -> tuple[str, bytes]:
    """(the name to print, the bytes) of a local config file or one on an object store (e.g. the
    ``best.yaml`` of an experiment stored on S3)."""
    if storage.is_remote(path):
        source = storage.redact(path)
        try:
            if not storage.is_file(path):
                raise ConfigError(f"config file not found: {source}")
            return source, storage.read_bytes(path)
        except storage.StorageError as e:
            raise ConfigError(f"config file {e}") from None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return str(p), p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or any key/value is invalid.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source, raw = _read_config_file(path)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {source}: {len(raw)} bytes; a config is at most {MAX_CONFIG_BYTES}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {source}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        try:
            loaded = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e)[:500]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded)
    cfg = Config.from_dict(data, source=source)
    if overrides:
        cfg = cfg.replace(overrides)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """A complete YAML file for ``cfg`` that load_config accepts."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

"""One task per model kind: everything the trainer, Tune and the CLI need to know about a kind.

A task answers, for its ``model.kind``:

- ``validate(cfg)``: the driver's checks of data and model before any worker starts;
- ``stream(cfg, rank, world)``: the worker's batches (``PairStream`` for text);
- ``build_encoder(cfg, path)`` and ``build_model(cfg, resume_dir)``: the encoder, and the
  training model around it (loss, after-step update, trainable parameters, bank);
- ``augmenter(cfg, encoder)`` and ``views(batch, aug, cfg, step, rank)``: the two views of a batch;
- ``dev_evaluator(cfg)`` and ``evaluate(dev, encoder, cfg)``: the dev checks at each checkpoint
  (``shared_dev``: run by every worker, each embedding 1/N, or by rank 0 alone);
- ``primary_metric`` (picks the best checkpoint), ``shown_metrics`` (the progress line) and
  ``metrics`` (what Tune may optimise).

``run_worker`` asks the task and never compares kind strings. Adding a fourth kind is one
``Task`` subclass and one line in ``TASKS`` (and the kind's name in ``ModelConfig.kind``);
docs/development.md shows how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from negatron.cluster import storage
from negatron.cluster.config import Config, ConfigError

from .metrics import GEOMETRY


@runtime_checkable
class TrainingModel(Protocol):
    """What ``run_worker`` and ``checkpoint`` need of the model a task builds (``ContrastiveModel``
    for bi-encoders and images, ``CrossEncoderModel`` for rerankers)."""

    encoder: Any  # saved as the checkpoint's model folder (``encoder.save``)
    temperature: Any  # ``losses.Temperature``
    bank: Any  # the cross-worker ``MemoryBank``, or None for a model that has none

    def loss(self, batch: dict, step: int) -> tuple[Any, dict]:
        """The batch's loss and the state ``after_step`` needs."""

    def forward_backward(self, batch: dict, step: int, scaler: Any = None,
                         before_last_backward: Callable[[], None] = lambda: None) -> tuple[Any, dict]:
        """``loss`` and its backward (scaled by an fp16 ``scaler``), in one pass or cached
        (``trainer.mini_batch_size``), calling ``before_last_backward`` before the backward pass
        that makes the gradients final; returns the detached loss and the state."""

    def after_step(self, state: dict, step: int) -> None:
        """After the optimizer step: enqueue bank keys, update a momentum encoder."""

    def trainable_parameters(self) -> list:
        """The parameters whose gradients are all-reduced and clipped."""

    def state_parts(self) -> dict[str, dict]:
        """Training state besides the encoder's weights, by part (one safetensors file each)."""

    def load_state_parts(self, read: Callable[[str], dict], where: Path) -> None:
        """Restore what ``state_parts`` saved; ``read(name)`` returns one part."""

    def queue_checksums(self) -> dict[str, str]:
        """Checksums of the queues it trains with (the bank, a guide's queue), by metrics key."""


def _check_guide(path: str) -> None:
    """loss.guide_model names a bi-encoder folder (a cross-encoder cannot score the bank's entries,
    which are stored as embeddings)."""
    from .model_io import ModelLoadError, read_json, resolve_model_path

    try:
        folder = resolve_model_path(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"loss.guide_model: {e}") from None
    archs = (read_json(folder / "config.json") or {}).get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"loss.guide_model: {path} is a cross-encoder ({archs[0]}); the guide must be a "
                          "bi-encoder folder, whose embeddings also score the bank's entries")


TEXT_METRICS = ("dev_mrr@10", "dev_recall@1", "dev_recall@10", "dev_recall@100", "dev_ndcg@10")


class Task:
    """The bi-encoder task (text pairs, InfoNCE with in-batch and bank negatives); the base class."""

    kind: ClassVar[str] = "bi-encoder"
    primary_metric: ClassVar[str] = "dev_mrr@10"
    shown_metrics: ClassVar[tuple[str, ...]] = ("mrr@10", "recall@10", "ndcg@10")
    metrics: ClassVar[tuple[str, ...]] = TEXT_METRICS
    what_trains: ClassVar[str] = "a pairs Parquet with query, positive, query_id, positive_id"
    shared_dev: ClassVar[bool] = True  # every worker takes part in a dev check (else rank 0 alone)
    # the model card's Hub metadata and usage (trainers/model_card.py)
    card_meta: ClassVar[dict[str, str]] = {"library_name": "sentence-transformers",
                                           "pipeline_tag": "sentence-similarity", "tag": "sentence-transformers"}
    card_usage: ClassVar[tuple[str, ...]] = (
        "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("path/to/this/folder")',
        'queries = model.encode_query(["how do I parse a date"])  # with the query prompt, if any',
        'docs = model.encode_document(["def parse_date(s): ..."])  # with the document prompt, if any',
        "print(model.similarity(queries, docs))")
    card_serving: ClassVar[str] = (
        "Or serve it: `negatron serve --model path/to/this/folder` (OpenAI-style `/v1/embeddings`; send "
        "`input_type: query` or `document` to get the prompts used in training).")

    # -- the driver ------------------------------------------------------------------------------

    def validate(self, cfg: Config) -> None:
        """Check data and model on the driver (raises ConfigError / SchemaError / ModelLoadError)."""
        from .model_io import resolve_model_path
        from .schema import check_eval_dir, open_pairs

        source = open_pairs(self._train_path(cfg))  # metadata and the first block, never the whole table
        self._check_batch(cfg, source.num_rows, "pairs")
        self._check_negatives(cfg, source.schema.names)
        if cfg.data.dev:
            check_eval_dir(cfg.data.dev)
        resolve_model_path(cfg.model.path)
        if cfg.loss.guide_model:
            _check_guide(cfg.loss.guide_model)

    @staticmethod
    def _check_negatives(cfg: Config, names: list[str]) -> None:
        """Negatives stored as ids only need the corpus their texts are in (never silently dropped)."""
        ids_only = "negative_ids" in names and "negatives" not in names
        if cfg.data.num_negatives and ids_only and not cfg.data.negatives_corpus:
            raise ConfigError(f"data.train: {cfg.data.train} has negative_ids but no negatives texts; set "
                              "data.negatives_corpus to the corpus they were mined from (`negatron mine` prints it), "
                              "or data.num_negatives=0 to train without them")
        if cfg.data.negatives_corpus and cfg.data.num_negatives and ids_only:
            from .lookup import TextLookup
            from .schema import SchemaError

            try:
                TextLookup(cfg.data.negatives_corpus)  # read once here: a wrong path fails before any worker
            except storage.StorageError as e:
                raise SchemaError(f"data.negatives_corpus: {e}") from None

    def _train_path(self, cfg: Config) -> str:
        if not cfg.data.train:
            raise ConfigError(f"data.train: not set ({self.what_trains})")
        return cfg.data.train

    @staticmethod
    def _check_batch(cfg: Config, rows: int, what: str) -> None:
        global_batch = cfg.trainer.batch_size * cfg.trainer.num_workers
        if rows < global_batch:
            raise ConfigError(f"trainer.batch_size × trainer.num_workers = {global_batch} exceeds the "
                              f"{rows} {what} in {cfg.data.train}")

    def weights_known(self, cfg: Config) -> bool:
        """Whether ``model.path`` names weight files (for Tune's memory estimate)."""
        return True

    # -- the worker ------------------------------------------------------------------------------

    def stream(self, cfg: Config, rank: int, world: int):
        """The worker's batches, streamed from ``data.train`` a block at a time (trainers/ingest.py)."""
        from .data import PairStream
        from .ingest import ParquetSource
        from .schema import check_pair_block

        lookup = None
        if cfg.data.negatives_corpus and cfg.data.num_negatives:
            from .lookup import TextLookup

            lookup = TextLookup(cfg.data.negatives_corpus)
        return PairStream(ParquetSource(cfg.data.train), cfg.trainer.batch_size, rank, world, seed=cfg.trainer.seed,
                          num_negatives=cfg.data.num_negatives, shuffle_rows=cfg.data.shuffle_rows,
                          check=check_pair_block, lookup=lookup)

    def build_encoder(self, cfg: Config, path: str | None = None):
        from .encoder import Encoder

        enc = Encoder.from_pretrained(path or cfg.model.path, pooling=cfg.model.pooling,
                                      projection_dim=cfg.model.projection_dim, normalize=cfg.model.normalize,
                                      max_length=cfg.model.max_length)
        enc.set_prompts(cfg.model.query_prompt or None, cfg.model.document_prompt or None)
        return enc

    def build_model(self, cfg: Config, resume_dir: str | None = None):
        from .step import ContrastiveModel

        guide = None
        if cfg.loss.guide_model:  # GISTEmbed: frozen, its own pooling and prompts, the run's max length
            from .encoder import Encoder

            guide = Encoder.from_pretrained(cfg.loss.guide_model, max_length=cfg.model.max_length)
        return ContrastiveModel.from_config(self.build_encoder(cfg, resume_dir), cfg, guide=guide)

    def head_lr(self, cfg: Config) -> float:
        """Learning rate of a fresh scoring head (0: the head trains at ``optim.lr``)."""
        return 0.0

    def augmenter(self, cfg: Config, encoder):
        from .augment import TextAugmenter

        a = cfg.augment
        return TextAugmenter(mask_prob=a.mask_prob, delete_prob=a.delete_prob, crop=a.crop,
                             crop_min_ratio=a.crop_min_ratio, mask_token=encoder.tokenizer.mask_token or "[MASK]")

    def views(self, batch: dict, aug, cfg: Config, step: int, rank: int) -> dict:
        from .step import augment_batch

        return augment_batch(batch, aug, cfg.augment.apply_to, cfg.augment.dropout_views, cfg.trainer.seed, step, rank)

    def dev_evaluator(self, cfg: Config) -> Any:
        """What is evaluated at each checkpoint (None without ``data.dev``); built on every rank
        when ``shared_dev``, else on rank 0 only."""
        from .evaluate import DevRetrieval

        if not cfg.data.dev:
            return None
        return DevRetrieval(cfg.data.dev, max_queries=cfg.data.max_dev_queries, max_docs=cfg.data.max_dev_docs,
                            batch_size=cfg.eval.batch_size, top_k=cfg.eval.top_k,
                            query_max_length=cfg.model.query_max_length or None)

    def evaluate(self, dev: Any, encoder, cfg: Config) -> dict[str, float] | None:
        """Dev metrics of ``encoder`` on rank 0; None on the other ranks of a shared check."""
        return dev.evaluate(encoder)


class BiEncoderTask(Task):
    """Text bi-encoder: the base task, whose dev check also reports Wang & Isola's alignment and
    uniformity of the dev embeddings (lower is better: usable as tune.metric with tune.mode min)."""

    metrics = TEXT_METRICS + tuple(f"dev_{k}" for k in GEOMETRY)


class CrossEncoderTask(Task):
    """Cross-encoder reranker: listwise contrastive loss over (positive, hard and in-batch negatives);
    dev checks rerank the top ``eval.rerank_depth`` of the ``eval.first_stage`` bi-encoder."""

    kind = "cross-encoder"
    shared_dev = False
    card_meta = {"library_name": "sentence-transformers", "pipeline_tag": "text-ranking", "tag": "cross-encoder"}
    card_usage = ("from sentence_transformers import CrossEncoder", "",
                  'model = CrossEncoder("path/to/this/folder")',
                  'scores = model.predict([("how do I parse a date", "def parse_date(s): ...")])')
    card_serving = ("Or serve it: `negatron serve --model BI_ENCODER --reranker path/to/this/folder` (`/rerank`, "
                    "Cohere's `/v2/rerank`).")

    def validate(self, cfg: Config) -> None:
        from .model_io import resolve_model_path

        super().validate(cfg)
        if cfg.data.dev:
            resolve_model_path(cfg.eval.first_stage)

    def build_encoder(self, cfg: Config, path: str | None = None):
        from .cross_encoder import CrossEncoder

        return CrossEncoder.for_training(path or cfg.model.path, max_length=cfg.model.max_length)

    def build_model(self, cfg: Config, resume_dir: str | None = None):
        from .rerank_step import CrossEncoderModel

        return CrossEncoderModel.from_config(self.build_encoder(cfg, resume_dir), cfg)

    def head_lr(self, cfg: Config) -> float:
        return cfg.optim.head_lr

    def dev_evaluator(self, cfg: Config) -> Any:
        if not cfg.data.dev:
            return None
        from .encoder import Encoder
        from .evaluate import RerankEval
        from .schema import check_eval_dir

        # first-stage candidates once; each check reranks them
        return RerankEval(Encoder.from_pretrained(cfg.eval.first_stage), check_eval_dir(cfg.data.dev),
                          depth=cfg.eval.rerank_depth, batch_size=cfg.eval.batch_size,
                          max_queries=cfg.data.max_dev_queries, max_docs=cfg.data.max_dev_docs,
                          query_max_length=cfg.model.query_max_length or None)

    def evaluate(self, dev: Any, encoder, cfg: Config) -> dict[str, float]:
        return dev.evaluate(encoder, chunk_size=cfg.eval.batch_size)


class ImageTask(Task):
    """Image encoder: SimCLR views of each image (two augmentations), the same InfoNCE and bank;
    dev checks are k-NN and probe accuracy on frozen features."""

    kind = "image"
    shared_dev = False  # small folders of images: rank 0 alone
    card_meta = {"library_name": "negatron", "pipeline_tag": "image-feature-extraction", "tag": "image"}
    card_usage = ("from negatron.trainers.image_encoder import ImageEncoder", "",
                  'model = ImageEncoder.from_pretrained("path/to/this/folder")', "emb = model.encode(images)")
    card_serving = "Or serve it: `negatron serve --model path/to/this/folder` (`/v1/images/embeddings`)."
    primary_metric = "dev_knn_acc"
    shown_metrics = ("knn_acc", "probe_acc", "fewshot_probe_acc")
    metrics = ("dev_knn_acc", "dev_probe_acc", "dev_fewshot_probe_acc")
    what_trains = "an images Parquet with id, image; `negatron data digits` makes one"

    def validate(self, cfg: Config) -> None:
        from .augment import ImageAugmenter
        from .image_encoder import decode_images, is_image_model
        from .schema import SchemaError, check_images

        if cfg.model.gradient_checkpointing or cfg.trainer.precision != "fp32":
            raise ConfigError("model.gradient_checkpointing and trainer.precision bf16/fp16 are for text models; "
                              "the image CNN trains in fp32")

        table = check_images(self._train_path(cfg))
        try:
            decode_images(table.column("image").slice(0, 64).to_pylist())
        except ValueError as e:
            raise SchemaError(f"{cfg.data.train}: column 'image': {e}") from None
        self._check_batch(cfg, table.num_rows, "images")
        if cfg.data.dev:
            for name in ("train", "test"):
                check_images(storage.join(cfg.data.dev, f"{name}.parquet"), labels=True)
        if cfg.model.path != "default" and not is_image_model(cfg.model.path):
            raise ConfigError(f"model.path: {cfg.model.path!r} is not an image encoder folder "
                              "(use 'cnn' for a new one, or a folder written by an image training run)")
        a = cfg.augment
        try:
            ImageAugmenter(a.strength, crop_min=a.image_crop_min)
        except ValueError as e:
            raise ConfigError(f"augment: {e}") from None

    def weights_known(self, cfg: Config) -> bool:
        return cfg.model.path != "default"  # the built-in CNN has no weight files

    def stream(self, cfg: Config, rank: int, world: int):
        """Image tables are small (decoded whole into memory)."""
        import pyarrow.parquet as pq

        from .data import ImageStream

        return ImageStream(pq.read_table(cfg.data.train), cfg.trainer.batch_size, rank, world, seed=cfg.trainer.seed)

    def build_encoder(self, cfg: Config, path: str | None = None):
        from .image_encoder import BUILTIN_CNN, build_image_encoder

        src = path or (BUILTIN_CNN if cfg.model.path == "default" else cfg.model.path)
        return build_image_encoder(src, seed=cfg.trainer.seed, channels=cfg.model.image_channels,
                                   image_size=cfg.model.image_size, width=cfg.model.image_width,
                                   dim=cfg.model.projection_dim or 64, normalize=cfg.model.normalize)

    def augmenter(self, cfg: Config, encoder):
        from .augment import ImageAugmenter

        a = cfg.augment
        return ImageAugmenter(a.strength, crop_min=a.image_crop_min, flip=a.image_flip, brightness=a.image_brightness,
                              contrast=a.image_contrast, noise=a.image_noise, blur=a.image_blur)

    def views(self, batch: dict, aug, cfg: Config, step: int, rank: int) -> dict:
        # SimCLR: two independently augmented views of the same images
        batch["query"] = aug(batch["query"], cfg.trainer.seed, step, rank, stream=0)
        batch["positive"] = aug(batch["positive"], cfg.trainer.seed, step, rank, stream=1)
        return batch

    def dev_evaluator(self, cfg: Config) -> Any:
        from .evaluate import ImageEval

        return ImageEval.load(cfg.data.dev) if cfg.data.dev else None

    def evaluate(self, dev: Any, encoder, cfg: Config) -> dict[str, float]:
        return dev.evaluate(encoder, k=cfg.eval.knn_k, shots=cfg.eval.probe_shots)


TASKS: dict[str, Task] = {t.kind: t for t in (BiEncoderTask(), CrossEncoderTask(), ImageTask())}


def task_for(cfg: Config) -> Task:
    """The task of ``cfg.model.kind``."""
    try:
        return TASKS[cfg.model.kind]
    except KeyError:  # the schema's Literal and TASKS disagree: a bug, named
        raise ConfigError(f"model.kind: {cfg.model.kind!r} has no task (known: {', '.join(TASKS)})") from None

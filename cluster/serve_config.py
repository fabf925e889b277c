"""The ``serve:`` section of a Negatron config: what `negatron serve` deploys and how it scales.

Every deployment has its own replica CPUs, autoscaling settings and batch limits. Ray Serve's own
defaults (30 s to scale up, 600 s to scale down, 1 CPU per replica) suit a big cluster, not a
2-core laptop, so the defaults here are small and quick; a cluster config raises them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import NegatronError


class ServeStartError(NegatronError, RuntimeError):
    """The Serve application did not start (a deployment failed or timed out); the message is one
    line. Defined here, with no Ray import, so the CLI can catch it without importing Ray."""


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` passes every `gt=0` bound and fails late (in Ray, or never)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class ScaleConfig(_Section):
    """Replica resources and autoscaling of one deployment (Ray Serve ``autoscaling_config``)."""

    num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per replica (fractional on small machines).")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas the autoscaler keeps.")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Scale up when requests in flight per replica exceed this.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica accepts at once (queue beyond it).")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of sustained load before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds of low load before a replica is removed.")
    look_back_period_s: float = Field(15.0, gt=0, description="Averaging window of the load metric.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Serve's health checks of a replica.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica.")

    @model_validator(mode="after")
    def _check(self) -> "ScaleConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        if self.max_ongoing_requests <= self.target_ongoing_requests:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} must exceed "
                             f"target_ongoing_requests {self.target_ongoing_requests}, or the replica never looks busy")
        return self


class BatchConfig(_Section):
    """``@serve.batch`` settings: requests are grouped, then run in length-sorted chunks."""

    max_batch_size: int = Field(32, ge=1, description="Requests per dynamic batch (1 = batching off).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Wait at most this long to fill a batch.")
    chunk_size: int = Field(64, ge=1, description=(
        "Most texts per forward pass inside a batch (the encoder splits a batch by token count "
        "where padding would cost more than another pass)."))


class EncoderServe(_Section):
    """The Encoder deployment: the served bi-encoder(s) and their batching."""

    path: str = Field("", description="Bi-encoder folder or 'default'; empty = the run's final/ checkpoint, else model.path.")
    name: str = Field("", pattern=r"^[A-Za-z0-9_.:\-]*$", description="Model name clients send (empty = the folder name).")
    models: dict[str, str] = Field(default_factory=dict, description="Extra encoders served side by side: name -> folder.")
    max_length: int = Field(0, ge=0, le=8192, description="Token limit per text (0 = the model's own).")
    colocate: bool = Field(False, description=(
        "Run the encoders inside the ingress replicas instead of an Encoder deployment: one actor hop "
        "less per request (best for many small requests on few cores); the ingress then takes "
        "encoder.scale and encoder.batch, and models are not multiplexed (all load in every replica)."))
    backend: Literal["torch", "onnx"] = Field("torch", description=(
        "Inference engine of the text encoders: PyTorch, or ONNX Runtime (exported from the checkpoint once and "
        "cached beside it by content hash; needs pip install 'negatron[onnx]')."))
    quantize: Literal["none", "int8"] = Field("none", description=(
        "backend onnx: int8 dynamic quantization of the weights. Refused at start-up, with the numbers, when "
        "the dev MRR@10 (serve.encoder.quantize_dev) drops by more than 0.005 against fp32, or without a dev "
        "set when the mean cosine to the fp32 embeddings is below 0.99."))
    quantize_dev: str = Field("", description=(
        "An eval folder (queries, corpus, qrels) that judges int8 by dev MRR@10; empty = cosine on calibration texts."))
    scale: ScaleConfig = ScaleConfig()
    # the wait applies only while other requests are in flight (serve.deployments.LoadAwareWait)
    batch: BatchConfig = BatchConfig(batch_wait_timeout_s=0.05)


class RerankerServe(_Section):
    """The Reranker deployment (optional): a cross-encoder for /rerank and reranked /search."""

    path: str = Field("", description="Cross-encoder folder (empty = no reranker).")
    name: str = Field("", pattern=r"^[A-Za-z0-9_.:\-]*$", description=(
        "The name clients send as `model` to /v1/rerank and /v2/rerank (empty = the run's or folder's name; "
        "'default' is always accepted)."))
    max_length: int = Field(0, ge=0, le=8192, description="Token limit per query+text pair (0 = the model's own).")
    backend: Literal["torch", "onnx"] = Field("torch", description=(
        "Inference engine of the cross-encoder: PyTorch or ONNX Runtime (exported once, cached beside it)."))
    scale: ScaleConfig = ScaleConfig()
    batch: BatchConfig = BatchConfig(max_batch_size=8, chunk_size=32)


class RetrieverServe(_Section):
    """The Retriever deployment (optional): a faiss index over a corpus for /search."""

    corpus: str = Field("", description="Corpus Parquet with doc_id, text (empty = no /search).")
    index_path: str = Field("", description=(
        "An index artifact from `negatron index build` (folder or URI): loaded as built, with its doc ids "
        "and texts, instead of embedding serve.retriever.corpus inside the replica. It must have been built "
        "with the served model (checked by content hash)."))
    watch_s: float = Field(0.0, ge=0, description=(
        "Every this many seconds the Retriever hashes its model folder; a checkpoint retrained into the same "
        "folder is picked up (the corpus index rebuilt, or the artifact reloaded once it matches) while the "
        "old index answers (0 = off)."))
    index: Literal["flat", "hnsw", "ivf"] = Field("flat", description="faiss index: exact (flat), HNSW graph, or IVF-flat.")
    build_actors: int = Field(2, ge=0, le=1024, description=(
        "`negatron serve` with a corpus and no index_path: the corpus is embedded by this many Ray Data actors "
        "(the `negatron embed` pipeline) and indexed before the Retriever starts, the artifact cached by model "
        "and corpus (0 = the Retriever replica embeds it itself, which is also what a `serve build` config deployed "
        "elsewhere does unless that artifact is already in its cache)."))
    build_cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per pipeline actor of build_actors.")
    build_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per pipeline actor of build_actors.")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW: neighbours per node.")
    hnsw_ef_search: int = Field(64, ge=1, description="HNSW: candidates explored per search (recall vs latency).")
    ivf_nlist: int = Field(0, ge=0, description="IVF lists (0 = about 4*sqrt(N)).")
    ivf_nprobe: int = Field(16, ge=1, description="IVF: lists scanned per search (recall vs latency).")
    cache_dir: str = Field("", description="Where built indexes are cached (empty = <corpus folder>/.negatron_index).")
    rerank_depth: int = Field(50, ge=1, le=1000, description="Candidates the reranker rescores when a search asks for rerank.")
    rerank_weight: float | None = Field(None, ge=0, le=1, description=(
        "Reranked search orders by w*z(reranker logit) + (1-w)*z(retrieval score) over the candidates "
        "(null = the weight saved with the reranker, negatron_rerank.json, else 1 = the reranker alone)."))
    scale: ScaleConfig = ScaleConfig()
    batch: BatchConfig = BatchConfig(max_batch_size=16)


class LimitsConfig(_Section):
    """Request limits: anything larger is refused with a JSON 413/422 naming the limit."""

    max_texts: int = Field(256, ge=1, description="Texts per /v1/embeddings or /rerank request.")
    max_text_chars: int = Field(20000, ge=1, description="Characters per text.")
    max_top_k: int = Field(100, ge=1, description="Most results per /search request.")
    max_body_bytes: int = Field(8_000_000, ge=1024, description=(
        "Largest request body; a bigger one is refused with 413 before it is parsed."))
    max_image_bytes: int = Field(2_000_000, ge=1024, description="Image models: largest encoded image.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Image models: largest width × height.")
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=1, description=(
        "Image models: pixels of all images of one request together, checked from the image headers "
        "before any is decoded (a few KB of one-bit PNGs can decode to gigabytes)."))
    overlong: Literal["truncate", "reject"] = Field(
        "truncate", description="A text longer than the model's token limit: truncate it, or answer 413.")


class ServeSection(_Section):
    """`negatron serve`: the HTTP app and its deployments."""

    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 exposes the API to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the API (the ingress replica's own with direct ingress, else Ray Serve's proxy's).")
    request_timeout_s: float = Field(60.0, ge=0, description=(
        "A request not answered within this many seconds gets an error instead of hanging (0 = no limit)."))
    startup_timeout_s: float = Field(600.0, gt=0, description=(
        "How long `negatron serve` waits for every deployment to be running before it gives up."))
    app_name: str = Field("negatron", pattern=r"^[A-Za-z0-9_\-]+$", description="Ray Serve application name (and the route prefix's default).")
    api_key_env: str = Field("", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$|^$",
                             description="Name of an environment variable holding the API key (empty = no key).")
    access_log: bool = Field(False, description=(
        "Log every request in each replica (costs CPU per request; errors are logged either way)."))
    direct_ingress: bool | Literal["auto"] = Field("auto", description=(
        "Ray Serve 2.60's direct ingress (Ray calls it experimental): the ingress replica itself listens on "
        "serve.port, so requests skip Serve's proxy, one process hop less each (measured here: 1.34x the "
        "texts/s at 32 concurrent clients, docs/serving.md). auto: on for the embedded Ray `negatron serve` "
        "starts when the ingress is one replica (ingress.max_replicas, or encoder.scale.max_replicas when "
        "colocated, = 1), off otherwise (a running cluster, `serve build`, several ingress replicas); true: "
        "on, and anything that cannot have it is refused; false: always through the proxy."))
    ingress: ScaleConfig = ScaleConfig(num_cpus=0.1, max_replicas=1, max_ongoing_requests=256)
    encoder: EncoderServe = EncoderServe()
    reranker: RerankerServe = RerankerServe()
    retriever: RetrieverServe = RetrieverServe()
    limits: LimitsConfig = LimitsConfig()

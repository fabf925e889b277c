"""Build, write and run the Negatron Serve application.

``app_builder`` is a typed Ray Serve application builder: its argument is the validated ``serve:``
config section, so ``serve run negatron.serve.app:app_builder`` and the YAML that
``negatron serve build`` writes (for ``serve run`` / ``serve deploy`` / a KubeRay RayService) go
through the same validation as ``negatron serve``.
"""

# No `from __future__ import annotations`: Ray Serve reads the builder's annotation as a class.

import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from ray import serve
from ray.serve import Application

from negatron.cluster import storage
from negatron.cluster.config import Config, ConfigError
from negatron.cluster.serve_config import ScaleConfig, ServeSection, ServeStartError

from .api import Ingress
from .schemas import IngressSettings
from .deployments import EncoderDeployment, RerankerDeployment, RetrieverDeployment

IMPORT_PATH = "negatron.serve.app:app_builder"


def short_serve_error(message: str) -> str:
    """The line that says what went wrong in a Serve status message (often a whole traceback)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln):
            return ln[:400]
    return (lines[0] if lines else "see the Ray logs")[:400]


def deployment_options(scale: ScaleConfig, access_log: bool = True, drain_s: float = 60.0) -> dict[str, Any]:
    """Ray Serve deployment options for one ScaleConfig.

    ``drain_s``: how long a replica being replaced (a redeploy, a downscale) keeps answering the
    requests it already holds before Serve kills it. Serve's rolling update stops an old replica
    before its successor is running, so a request can wait on a replica that is still starting;
    with Serve's default (20 s) the ingress holding it was killed first and the client got the
    proxy's plain-text 500. It is the request timeout, so nothing the proxy still waits for is cut.
    """
    return {
        "logging_config": {"enable_access_log": access_log},
        "num_replicas": "auto",
        "autoscaling_config": {
            "min_replicas": scale.min_replicas,
            "initial_replicas": max(1, scale.min_replicas),
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "look_back_period_s": scale.look_back_period_s,
        },
        "max_ongoing_requests": scale.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": scale.num_cpus},
        "health_check_period_s": scale.health_check_period_s,
        "graceful_shutdown_timeout_s": max(20.0, drain_s),
        # how often a stopping replica looks for zero requests in flight (Serve's default: 2 s)
        "graceful_shutdown_wait_loop_s": 0.25,
    }


def _image_shape(folder: Path) -> tuple[int, int] | None:
    """(input side, channels) of an image encoder folder; None for a text model."""
    from negatron.trainers.model_io import IMAGE_CONFIG, read_json

    image = read_json(folder / IMAGE_CONFIG)
    if not isinstance(image, dict):
        return None
    return int(image.get("image_size", 16)), int(image.get("channels", 1))


def _model_facts(folder: Path) -> tuple[int, int]:
    """(default max length, embedding dim) of a bi-encoder folder, without loading weights
    (max length 0 for an image encoder)."""
    from negatron.trainers.model_io import IMAGE_CONFIG, read_json, read_st_settings

    image = read_json(folder / IMAGE_CONFIG)
    if isinstance(image, dict):
        return 0, int(image.get("dim", 0))
    st = read_st_settings(folder)
    hf = read_json(folder / "config.json") or {}
    dim = st.get("projection_dim") or int(hf.get("hidden_size", 0))
    return int(st.get("max_length", 128)), dim


def app_builder(args: ServeSection) -> Application:
    """The application for a ``serve:`` section (paths resolved on the machine that builds it).

    Raises:
        ConfigError: no encoder path, or a model/corpus path that does not exist.
    """
    from negatron.trainers.model_io import ModelLoadError, read_prompts, resolve_model_path

    if not args.encoder.path:
        raise ConfigError("serve.encoder.path is empty: give a bi-encoder folder, a run folder or 'default' (--model)")
    from negatron.trainers.model_io import require_safetensors

    try:
        default_folder = resolve_model_path(args.encoder.path)
        names = {(args.encoder.name or served_name(args.encoder.path, default_folder)): default_folder}
        for name, path in args.encoder.models.items():
            if name in names:
                raise ConfigError(f"serve.encoder.models: name {name!r} is already used by the default model")
            names[name] = resolve_model_path(path)
        for folder in names.values():  # refused here, not as a 503 at the first request
            require_safetensors(folder)
    except ModelLoadError as e:
        raise ConfigError(f"serve.encoder: {e}") from None
    default_name = next(iter(names))
    facts = {n: _model_facts(p) for n, p in names.items()}
    # replicas get the URI of a model on an object store (each node fetches it), else the local folder
    given = {default_name: args.encoder.path, **args.encoder.models}
    models = {n: (given[n] if storage.is_remote(given[n]) else str(p)) for n, p in names.items()}
    from negatron.trainers.model_io import IMAGE_CONFIG

    image_models = sorted(n for n, p in names.items() if (p / IMAGE_CONFIG).is_file())
    if args.retriever.corpus and default_name in image_models:
        raise ConfigError("serve.retriever.corpus: search embeds text, but the default model "
                          f"{default_name!r} is an image encoder")

    drain = args.request_timeout_s or 600.0  # 0 = no request limit: still bounded, as a kill must be
    backend = _prepare_backend(args, names, image_models)
    encoder = None
    if not args.encoder.colocate:
        encoder = EncoderDeployment.options(**deployment_options(args.encoder.scale, args.access_log, drain)).bind(
            models, args.encoder.max_length, args.encoder.batch.model_dump(), args.encoder.scale.torch_threads,
            backend)

    reranker = None
    rr_path = rr_local = ""
    if args.reranker.path:
        from negatron.trainers.model_io import in_run_folder, local_model_folder

        try:
            rr = in_run_folder(local_model_folder(args.reranker.path), "config.json")
            if not (rr / "config.json").is_file():
                raise ConfigError(f"serve.reranker.path: not a Hugging Face model folder: {args.reranker.path}")
            require_safetensors(rr, "reranker")
        except ModelLoadError as e:
            raise ConfigError(f"serve.reranker.path: {e}") from None
        rr_local = str(rr.resolve())
        rr_path = args.reranker.path if storage.is_remote(args.reranker.path) else rr_local
        if args.reranker.backend == "onnx":
            from negatron.trainers import onnx_backend

            onnx_backend.prepare(rr_local, "none", log=_say)  # exported once here, before any replica
        reranker = RerankerDeployment.options(**deployment_options(args.reranker.scale, args.access_log, drain)).bind(
            rr_path, args.reranker.max_length, args.reranker.batch.model_dump(), args.reranker.scale.torch_threads,
            args.reranker.backend)

    retriever = None
    if args.retriever.corpus or args.retriever.index_path:
        r = args.retriever
        user_config = {"model": models[default_name], "max_length": args.encoder.max_length, "watch_s": r.watch_s}
        options = deployment_options(r.scale, args.access_log, drain)
        if r.index_path:
            meta = _check_artifact(r.index_path, names[default_name], default_name)
            user_config["index_path"] = r.index_path
            # the index and a second one while a swap builds beside it, plus the model
            options["ray_actor_options"]["memory"] = int(2 * meta["index_bytes"] + 512 * 2**20)
        else:
            corpus = r.corpus
            try:
                if not storage.is_file(corpus):
                    raise ConfigError(f"serve.retriever.corpus: file not found: {storage.redact(corpus)}")
            except storage.StorageError as e:
                raise ConfigError(f"serve.retriever.corpus: {e}") from None
            built = _pipeline_artifact(args, names[default_name], default_name)
            if built:  # `negatron serve` indexed the corpus with the pipeline: load that, per model
                user_config["artifacts"], meta = built
                options["ray_actor_options"]["memory"] = int(2 * meta["index_bytes"] + 512 * 2**20)
            user_config.update({"corpus": storage.resolve(corpus), "index": r.index, "cache_dir": r.cache_dir,
                                "hnsw_m": r.hnsw_m, "hnsw_ef_search": r.hnsw_ef_search, "ivf_nlist": r.ivf_nlist,
                                "ivf_nprobe": r.ivf_nprobe})
        retriever = RetrieverDeployment.options(**options, user_config=user_config).bind(
            r.batch.model_dump(), r.scale.torch_threads)

    settings = IngressSettings(**{
        "models": models, "default_model": default_name, "limits": args.limits,
        "max_length": args.encoder.max_length, "model_max_lengths": {n: f[0] for n, f in facts.items()},
        "dims": {n: f[1] for n, f in facts.items()}, "reranker_path": rr_path,
        "reranker_name": (args.reranker.name or served_name(args.reranker.path, Path(rr_local))) if rr_path else "",
        "reranker_max_length": args.reranker.max_length or _reranker_len(rr_local),
        "rerank_depth": args.retriever.rerank_depth, "rerank_weight": _rerank_weight(args, rr_local),
        "api_key_env": args.api_key_env,
        "colocate": args.encoder.colocate, "batch": args.encoder.batch,
        "torch_threads": args.encoder.scale.torch_threads, "image_models": image_models,
        "image_shapes": {n: _image_shape(names[n]) for n in image_models},
        "prompts": {n: read_prompts(p) for n, p in names.items() if n not in image_models},
        "backend": backend,
        "request_timeout_s": args.request_timeout_s,
        # calls the ingress keeps in flight to a separate Encoder: enough for its autoscaler to
        # reach max_replicas (serve.deployments.Coalescer)
        "encoder_slots": max(1, math.ceil(args.encoder.scale.max_replicas * args.encoder.scale.target_ongoing_requests)),
    })
    # colocated, the ingress carries the encoders, so it takes the encoder's resources and scaling
    ingress_scale = args.encoder.scale if args.encoder.colocate else args.ingress
    return Ingress.options(**deployment_options(ingress_scale, args.access_log, drain)).bind(encoder, reranker, retriever, settings)


def _say(line: str) -> None:
    print(f"[negatron] {line}", flush=True)


def _prepare_backend(args: ServeSection, names: dict[str, Path], image_models: list[str]) -> dict:
    """serve.encoder.backend / quantize: export (and for int8, check) every text model here on the
    driver, so a refused quantization stops `negatron serve` with its numbers before any replica
    starts; replicas load the cached export."""
    backend = {"backend": args.encoder.backend, "quantize": args.encoder.quantize}
    if args.encoder.backend == "torch":
        if args.encoder.quantize != "none":
            raise ConfigError("serve.encoder.quantize: int8 needs serve.encoder.backend: onnx")
        return backend
    if image_models:
        raise ConfigError(f"serve.encoder.backend: onnx serves text encoders; {', '.join(image_models)} "
                          "embeds images (use backend: torch)")
    from negatron.trainers import onnx_backend

    for name, folder in names.items():
        _, check = onnx_backend.prepare(folder, args.encoder.quantize, args.encoder.quantize_dev or None,
                                        log=_say)
        if check:
            _say(f"{name}: int8 accepted ({check})")
    return backend


def _pipeline_artifact(args: ServeSection, model_folder: Path, name: str) -> tuple[dict, dict] | None:
    """(artifact spec, index.json) when the pipeline has built the served model's artifact for
    ``serve.retriever.corpus`` (serve.prebuild); None when it is off or has not run (the replica
    then embeds the corpus itself)."""
    from negatron.trainers.model_io import model_id

    from .prebuild import artifact_path, artifact_spec, is_built

    if args.retriever.build_actors <= 0:
        return None
    spec = artifact_spec(args, log=lambda m: None)
    path = artifact_path(spec, model_id(model_folder))
    return (spec, _check_artifact(path, model_folder, name)) if is_built(path) else None


def _check_artifact(path: str, model_folder: Path, name: str) -> dict:
    """index.json of an index artifact, refused (ConfigError) when it is missing, has no texts, or
    was built with another model than the one served."""
    from negatron.trainers.model_io import model_id
    from negatron.trainers.vector_index import META_FILE

    try:
        meta_path = storage.join(path, META_FILE)
        if not storage.is_file(meta_path):
            raise ConfigError(f"serve.retriever.index_path: {storage.redact(path)} is not an index artifact "
                              f"(no {META_FILE}; build one with `negatron embed` and `negatron index build`)")
        meta = storage.read_json(meta_path)
    except (storage.StorageError, ValueError) as e:
        raise ConfigError(f"serve.retriever.index_path: {e}") from None
    if not meta.get("texts"):
        raise ConfigError(f"serve.retriever.index_path: {storage.redact(path)} was built without texts; "
                          "rebuild it with --corpus so /search can return them")
    built, served = (meta.get("model") or {}).get("id"), model_id(model_folder)
    if built != served:
        raise ConfigError(f"serve.retriever.index_path: {storage.redact(path)} was built with model "
                          f"{(meta.get('model') or {}).get('path')} (content id {built}), but the served model {name!r} "
                          f"has content id {served}: queries would be embedded by another model; embed and index "
                          "the corpus with the served model")
    return meta


def _rerank_weight(args, rr_path: str) -> float:
    """serve.retriever.rerank_weight, else the weight saved with the reranker, else 1."""
    from negatron.trainers.cross_encoder import saved_rerank_weight

    if args.retriever.rerank_weight is not None:
        return float(args.retriever.rerank_weight)
    if not rr_path:
        return 1.0
    try:
        w = saved_rerank_weight(rr_path)
    except ValueError as e:
        raise ConfigError(f"serve.reranker.path: {e}") from None
    return 1.0 if w is None else w


def served_name(path: str, folder: Path) -> str:
    """The name clients send when serve.encoder.name is empty: 'all-MiniLM-L6-v2' for 'default',
    the run's name for a Negatron run's final/ or best/ checkpoint, else the folder name."""
    if path == "default":
        return "all-MiniLM-L6-v2"
    if storage.is_remote(path):  # fetched into a cache folder: name it after the URI
        name = storage.name(path)
        return storage.name(storage.parent(path)) if name in ("final", "best") else name
    if folder.name in ("final", "best") and (folder.parent / "metrics.json").is_file():
        return folder.parent.name
    return folder.name


def _reranker_len(folder: str) -> int:
    if not folder:
        return 0
    from negatron.trainers.model_io import read_json

    st = read_json(Path(folder) / "sentence_bert_config.json") or {}
    return int(st.get("max_seq_length") or 512)


def resolve_section(cfg: Config) -> ServeSection:
    """The ``serve:`` section with the encoder path filled in and local paths made absolute.

    An empty ``serve.encoder.path`` means the run's ``final/`` checkpoint when it exists, else
    ``model.path``: a training config can be served as it is.
    """
    s = cfg.serve
    enc = s.encoder.path
    if not enc:
        final = storage.join(cfg.run.storage_path, cfg.run.name, "final")
        try:
            enc = final if storage.is_file(storage.join(final, "config.json")) else cfg.model.path
        except storage.StorageError as e:
            raise ConfigError(f"run.storage_path: {e}") from None

    def absolute(p: str) -> str:
        return p if not p or p == "default" else storage.resolve(p)

    data = s.model_dump(mode="json")
    data["encoder"]["path"] = absolute(enc)
    data["encoder"]["models"] = {n: absolute(p) for n, p in s.encoder.models.items()}
    data["reranker"]["path"] = absolute(s.reranker.path)
    data["retriever"]["corpus"] = absolute(s.retriever.corpus)
    data["retriever"]["cache_dir"] = absolute(s.retriever.cache_dir)
    data["retriever"]["index_path"] = absolute(s.retriever.index_path)
    return ServeSection.model_validate(data)


def serve_config_yaml(section: ServeSection) -> str:
    """A Ray Serve config file (``serve run`` / ``serve deploy`` / KubeRay ``serveConfigV2``)."""
    if section.direct_ingress is True:  # a cluster-wide Serve setting the file cannot carry ("auto" is off here)
        direct_ingress_env(section, embedded=False)  # raises, naming what to do instead
    doc = {
        "proxy_location": "EveryNode",
        "http_options": http_options(section),
        "applications": [{
            "name": section.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": section.model_dump(mode="json"),
        }],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def http_options(section: ServeSection, proxy_port: int | None = None) -> dict:
    opts: dict = {"host": section.host, "port": proxy_port or section.port}
    if section.request_timeout_s:
        opts["request_timeout_s"] = section.request_timeout_s
    return opts


def start(section: ServeSection, blocking_wait_s: float | None = None, proxy_port: int | None = None) -> str:
    """Deploy on the connected Ray; returns the base URL once every deployment is healthy.

    ``proxy_port``: where Serve's proxy listens instead of ``serve.port`` (with direct ingress the
    ingress replica takes ``serve.port``; Serve 2.60 still starts a proxy, which then goes unused)."""
    blocking_wait_s = section.startup_timeout_s if blocking_wait_s is None else blocking_wait_s
    serve.start(http_options=http_options(section, proxy_port))
    from .deployments import mark_ready

    mark_ready(section.app_name, False)  # a fresh deploy: not ready until every deployment answers
    # serve.run would wait for RUNNING itself (with no deadline, raising Serve's whole error text):
    # deploy without waiting and watch the status here
    serve.run_many([serve.RunTarget(app_builder(section), name=section.app_name, route_prefix="/")],
                   wait_for_applications_running=False)
    deadline = time.monotonic() + blocking_wait_s
    while True:
        st = serve.status().applications.get(section.app_name)
        if st is not None and st.status == "RUNNING":
            break
        if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeStartError(f"Serve application {section.app_name!r} failed to start: {_deployment_errors(st)}")
        if time.monotonic() > deadline:
            state = "not deployed yet" if st is None else f"{st.status}; " + "; ".join(
                f"{n}: {d.status} {short_serve_error(d.message) if d.message else ''}".strip()
                for n, d in st.deployments.items())
            raise ServeStartError(f"Serve application {section.app_name!r} was not running after "
                               f"{blocking_wait_s:.0f} s ({state}); raise serve.startup_timeout_s or check the Ray logs")
        time.sleep(0.5)
    host = "127.0.0.1" if section.host in ("0.0.0.0", "::") else section.host
    return f"http://{host}:{section.port}"


def _deployment_errors(st) -> str:
    failed = [f"{n}: {short_serve_error(d.message)}" for n, d in st.deployments.items()
              if d.message and str(d.status).endswith(("DEPLOY_FAILED", "UNHEALTHY"))]
    return "; ".join(failed) or short_serve_error(st.message)


def _check_port_free(host: str, port: int) -> None:
    """On the embedded Ray the proxy binds here: a taken port would only show up deep in Serve's logs."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"serve.port: cannot listen on {host}:{port} ({e.strerror}); "
                              "pick another port with --port") from None


def _begin_stop(app_name: str) -> None:
    """Tell the ingress to refuse new requests before its app is deleted (see ``Ingress.begin_stop``).
    Best effort: an app that never started, or an ingress that does not answer, is deleted anyway."""
    try:
        serve.get_app_handle(app_name).begin_stop.remote().result(timeout_s=10)
    except Exception:  # noqa: BLE001 - the delete below stops it either way
        pass


def _ingress_scale(section: ServeSection):
    """The scale of the deployment that takes HTTP requests (the encoders' when colocated)."""
    return section.encoder.scale if section.encoder.colocate else section.ingress


def uses_direct_ingress(section: ServeSection, embedded: bool) -> bool:
    """``serve.direct_ingress``: true and false as set; auto is on exactly where it can be (the
    embedded Ray, one ingress replica)."""
    if section.direct_ingress != "auto":
        return bool(section.direct_ingress)
    return embedded and _ingress_scale(section).max_replicas == 1


def prepare_direct_ingress(section: ServeSection, embedded: bool) -> Optional[int]:
    """Before the embedded Ray starts: put the direct-ingress settings in this process's
    environment (Ray's processes inherit them) when ``section`` uses it, and return the free port
    for Serve's unused proxy (which must not take serve.port from the ingress replica); None when
    requests go through the proxy."""
    if not uses_direct_ingress(section, embedded):
        return None
    from negatron.cluster.local import free_port

    os.environ.update(direct_ingress_env(section, embedded))
    return free_port()


def direct_ingress_env(section: ServeSection, embedded: bool) -> dict[str, str]:
    """The environment that makes Ray Serve 2.60 run ``section`` with direct ingress: the one ingress
    replica serving HTTP itself on ``serve.port`` (Serve allocates replica ports from a range, here
    exactly that port), no proxy hop (Serve still starts a proxy; `run_until_signal` moves it to
    another port, where nothing calls it). Serve reads these settings when its processes start, so
    they must be in the environment before the embedded Ray starts.

    Raises:
        ConfigError: not the embedded Ray, or an ingress that may have more than one replica.
    """
    if not embedded:
        raise ConfigError("serve.direct_ingress: only on the embedded Ray `negatron serve` starts (on a running "
                          "cluster it is a cluster-wide Ray Serve setting, RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on "
                          "every node, with a load balancer in front of the replicas' ports)")
    scale = _ingress_scale(section)
    if scale.max_replicas != 1:
        key = "serve.encoder.scale.max_replicas" if section.encoder.colocate else "serve.ingress.max_replicas"
        raise ConfigError(f"serve.direct_ingress: the ingress must be one replica (it listens on serve.port "
                          f"itself), but {key} is {scale.max_replicas}")
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(section.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(section.port + 1),  # Serve's range excludes the maximum
        # a replacement replica (after a crash) takes the same port at once, and a stop does not
        # wait 30 s for an external load balancer that is not there
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def run_until_signal(section: ServeSection, address: Optional[str] = None, log=print) -> None:
    """`negatron serve`: start Ray (embedded by default), deploy, print the URL, stop on Ctrl-C/SIGTERM."""
    from negatron.cluster.local import ensure_ray

    if section.api_key_env and not os.environ.get(section.api_key_env):
        raise ConfigError(f"serve.api_key_env is {section.api_key_env!r}, but that environment variable is not set")
    embedded = not (address or os.environ.get("NEGATRON_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"))
    if embedded:
        _check_port_free(section.host, section.port)
    proxy_port = prepare_direct_ingress(section, embedded)  # before Ray starts
    ensure_ray(address)
    import ray

    # after ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the process
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    from .prebuild import build_artifact, uses_pipeline, watch_model

    try:
        if uses_pipeline(section):  # a corpus alone: indexed by the pipeline, here, before any replica
            build_artifact(section, address, log)
        log("negatron serve: starting deployments (the first start loads models and may build the index)...")
        url = start(section, proxy_port=proxy_port)
        via = "the ingress replica answers directly" if proxy_port else "through Serve's proxy"
        log(f"negatron serve: ready at {url}  ({via}; docs: {url}/docs; Ctrl-C to stop)")
        watch_model(section, stop, address, log)
        log("negatron serve: shutting down...")
    finally:
        try:
            if proxy_port:  # direct ingress: no proxy stops routing to the ingress when its app goes
                _begin_stop(section.app_name)
            serve.delete(section.app_name)  # on a shared cluster, only our application goes
            if embedded:
                serve.shutdown()
        finally:
            ray.shutdown()

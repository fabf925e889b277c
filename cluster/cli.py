"""The ``negatron`` command line.

User errors (bad config, bad data, missing model) print one line ``negatron: error: ...`` and
exit 2; nothing is written. Set NEGATRON_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import ConfigError
from .errors import NegatronError


def _cmd_prepare(args: argparse.Namespace) -> int:
    from negatron.trainers.prepare import prepare

    prepare(args.inputs, args.out, rows_per_file=args.rows_per_file, row_group_rows=args.row_group_rows)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from negatron.trainers.stdlib_data import build_pycode_dataset, build_stdlib_dataset

    t0 = time.perf_counter()
    build = build_pycode_dataset if args.dataset == "pycode" else build_stdlib_dataset
    counts = build(args.out, seed=args.seed)
    print(f"built the {args.dataset} code-search dataset in {args.out} ({time.perf_counter() - t0:.1f}s)")
    print(f"  train: {counts['train']['pairs']} pairs")
    for split in ("dev", "test"):
        c = counts[split]
        print(f"  {split}: {c['queries']} queries, {c['corpus']} corpus docs ({c['distractors']} distractors)")
    return 0


def _cmd_digits(args: argparse.Namespace) -> int:
    from negatron.trainers.digits_data import build_digits_dataset

    info = build_digits_dataset(args.out, seed=args.seed)
    print(f"built the digits image dataset in {args.out}: {info['images']} {info['size'][0]}x{info['size'][1]} images, "
          f"{info['classes']} classes")
    print(f"  train.parquet: {info['train']} images (id, image, label)   eval/: train {info['train']}, test {info['test']}")
    return 0


def _eval_images(args: argparse.Namespace) -> int:
    from negatron.trainers.evaluate import ImageEval
    from negatron.trainers.image_encoder import build_image_encoder

    data = ImageEval.load(args.data)  # before loading any model
    _torch_threads(args.threads)
    metrics = data.evaluate(build_image_encoder(args.model), shots=args.shots)
    metrics.update(model=args.model, data=str(args.data), train_images=len(data.train_y), test_images=len(data.test_y))
    for k in ("knn_acc", "probe_acc", "fewshot_probe_acc"):
        if k in metrics:
            print(f"{k:>18}: {metrics[k]:.4f}")
    if args.out:
        _write_json(args.out, metrics)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder, format_table
    from negatron.trainers.image_encoder import is_image_model
    from negatron.trainers.schema import check_eval_dir

    if is_image_model(args.model):
        return _eval_images(args)
    _torch_threads(args.threads)
    if _eval_on_pipeline(args):
        from negatron.trainers.evaluate import evaluate_pipeline

        metrics = evaluate_pipeline(args.model, args.data, work=args.work, index=args.index, actors=args.actors or 2,
                                    cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                    batch_size=args.batch_size, max_length=args.max_length, kind=args.index_kind,
                                    address=args.address)
    else:
        data = check_eval_dir(args.data)  # before loading any model
        encoder = Encoder.from_pretrained(args.model, max_length=args.max_length)
        if args.reranker:
            return _eval_two_stage(args, encoder, data)
        metrics = evaluate_encoder(encoder, data, batch_size=args.batch_size, top_k=100)
    metrics["model"] = args.model
    metrics["data"] = str(args.data)
    print(format_table({Path(args.model).name if args.model != "default" else "default": metrics}))
    if "index_kind" in metrics:
        recall = (f", index recall@10 {metrics['index_recall_at_10']:.4f} against exact search"
                  if "index_recall_at_10" in metrics else "")
        print(f"{metrics['num_queries']} queries, {metrics['num_docs']} docs ({metrics['index_kind']} index{recall}); "
              f"embedding and indexing {metrics['pipeline_s']:.1f}s, queries {metrics['encode_queries_s']:.1f}s")
    else:
        print(f"{metrics['num_queries']} queries, {metrics['num_docs']} docs; encoding "
              f"{metrics['encode_corpus_s'] + metrics['encode_queries_s']:.1f}s")
    if args.out:
        _write_json(args.out, metrics)
    return 0


def _eval_on_pipeline(args: argparse.Namespace) -> bool:
    """Whether `negatron eval` embeds the corpus with the Ray Data pipeline: asked (--actors N,
    --index), or left to the corpus size (more than PIPELINE_ABOVE docs, read from the metadata)."""
    from negatron.trainers.evaluate import PIPELINE_ABOVE
    from negatron.trainers.schema import open_corpus

    from . import storage

    asked = bool(args.actors) or bool(args.index)
    if args.reranker:
        if asked:
            raise ConfigError("eval: --reranker scores in this process; drop --actors / --index")
        return False
    if asked:
        return True
    if args.actors == 0 or not storage.is_dir(args.data):
        return False  # 0: in this process; a missing folder gets check_eval_dir's message
    try:
        rows = open_corpus(storage.join(args.data, "corpus.parquet")).num_rows
    except Exception:  # noqa: BLE001 - check_eval_dir names what is wrong with it
        return False
    if rows > PIPELINE_ABOVE:
        print(f"eval: {rows} docs: embedding them with the Ray Data pipeline (2 actors; --actors 0 keeps it in this process)")
        return True
    return False


def _write_json(path: str, obj: dict) -> None:
    from .storage import write_json

    write_json(path, obj)  # a local file or a URI
    print(f"wrote {path}")


def _eval_two_stage(args: argparse.Namespace, encoder, data) -> int:
    from negatron.trainers.cross_encoder import RERANK_FILE, CrossEncoder, saved_rerank_weight
    from negatron.trainers.evaluate import evaluate_two_stage, format_table

    weight, source = args.rerank_weight, "--rerank-weight"
    if weight is None:
        try:
            weight, source = saved_rerank_weight(args.reranker), f"{args.reranker}/{RERANK_FILE}"
        except ValueError as e:
            raise ConfigError(f"--reranker: {e}") from None
        if weight is None:
            weight, source = 1.0, "default"
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--rerank-weight must be in [0, 1], got {weight:g}")
    reranker = CrossEncoder.from_pretrained(args.reranker)
    out = evaluate_two_stage(encoder, reranker, data, depth=args.rerank_depth, batch_size=args.batch_size,
                             weights=(weight,))
    out["model"], out["reranker"], out["data"] = args.model, args.reranker, str(args.data)
    label = f"+ reranker@{args.rerank_depth}" + (f" (w={weight:g})" if weight != 1.0 else "")
    print(format_table({"bi-encoder": out["retrieval"], label: out["reranked"]}))
    if weight != 1.0:
        print(f"reranker weight {weight:g} ({source}): z-scored reranker logits fused with the bi-encoder's scores")
    print(f"{out['retrieval']['num_queries']} queries, {out['retrieval']['num_docs']} docs; reranking "
          f"{out['reranked']['rerank_s']:.1f}s")
    if args.out:
        _write_json(args.out, out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from negatron.trainers.train import run_training

    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    res = run_training(cfg, address=args.address)
    print(f"\nrun folder: {res.run_dir}")
    print(f"final model: {res.final_dir}" + (f"  best model: {res.best_dir}" if res.best_dir else ""))
    print(json.dumps(res.metrics, indent=2))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from negatron.tune.results import format_rows
    from negatron.tune.search import run_tune

    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    out = run_tune(cfg, address=args.address)
    print("\n" + format_rows(out.rows, cfg))
    print(f"\nexperiment: {out.experiment_dir}")
    print(f"results: {out.experiment_dir / 'results.parquet'}" + (f"  plot: {out.plot}" if out.plot else ""))
    if out.best_config_path:
        print(f"best {cfg.tune.metric}: {out.best_metric:.4f}")
        print(f"best config: {out.best_config_path}  (negatron train --config {out.best_config_path})")
        print(f"best checkpoint: {out.best_checkpoint}")
    else:
        print("no trial finished with a metric")
        return 1
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    """Build data, evaluate zero-shot, fine-tune with 2 workers + bank, evaluate, compare."""
    from negatron.trainers.recipes import quickstart

    from .config import load_config

    cfg = load_config(args.config or Path(__file__).with_name("quickstart.yaml"), args.overrides)
    _torch_threads(args.threads)
    quickstart(cfg, address=args.address, with_reranker=args.with_reranker, reranker_steps=args.reranker_steps,
               rerank_depth=args.rerank_depth, reranker_init=args.reranker_init)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """`negatron serve [build]`: run the HTTP API, or write a Ray Serve config file."""
    from negatron.serve.app import resolve_section, run_until_signal, serve_config_yaml

    from .config import load_config

    overrides = list(args.overrides)
    action = "run"
    if overrides and overrides[0] in ("build", "run"):
        action = overrides.pop(0)
    flags = {"serve.encoder.path": args.model, "serve.reranker.path": args.reranker,
             "serve.retriever.corpus": args.corpus, "serve.retriever.index_path": args.index, "serve.host": args.host, "serve.port": args.port,
             "serve.api_key_env": args.api_key_env}
    cfg = load_config(args.config, overrides)
    # flags are taken as given (strings), never re-parsed as YAML: `--host ::`, `--model "dir #x"`
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = cfg.replace(given) if given else cfg
    section = resolve_section(cfg)
    if action == "build":
        text = serve_config_yaml(section)
        if args.output in (None, "-"):
            sys.stdout.write(text)
        else:
            from .files import write_text

            write_text(args.output, text)
            print(f"wrote {args.output}  (serve run {args.output} | serve deploy {args.output})")
        return 0
    run_until_signal(section, address=args.address)
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from negatron.trainers.mine import mine

    stats = mine(args.model, args.data, args.out, k=args.k, skip=args.skip, take=args.take, margin=args.margin,
                 corpus=args.corpus, max_length=args.max_length, workers=args.workers,
                 cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, with_texts=args.with_texts,
                 index_kind=args.index_kind, work=args.work, address=args.address)
    print(f"wrote {stats['out']}: {stats['pairs']} pairs, {stats['negatives_per_query_mean']:.1f} hard negatives "
          f"per query from {stats['corpus']} candidates ({stats['queries_without_negatives']} queries got none) "
          f"in {stats['wall_s']:.0f}s")
    extra = "" if args.with_texts else f" data.negatives_corpus={stats['negatives_corpus']}"
    print("train on it with: negatron train data.train=" + stats["out"] + extra + " data.num_negatives=N")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from negatron.trainers.embed import embed_corpus

    m = embed_corpus(args.model, args.data, args.out, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                     gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, max_length=args.max_length or 0,
                     shard_rows=args.shard_rows, address=args.address)
    rate = f", {m['docs_per_s']:.0f} docs/s" if m.get("docs_per_s") else ""
    print(f"wrote {m['count']} embeddings (dim {m['dim']}) in {len(m['shards'])} shards to {args.out} "
          f"({m['embedded_now']} embedded now in {m['wall_s']:.0f}s{rate})")
    print(f"build an index with: negatron index build --embeddings {args.out} --kind flat --out INDEX_DIR")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from negatron.trainers.vector_index import build_index

    params = {"nlist": args.nlist, "nprobe": args.nprobe, "pq_m": args.pq_m, "refine": args.refine, "hnsw_m": args.hnsw_m,
              "ef_search": args.ef_search}
    meta = build_index(args.embeddings, args.kind, args.out, params=params, train_size=args.train_size,
                       eval_queries=args.eval_queries, seed=args.seed, corpus=args.corpus)
    print(f"wrote a {meta['kind']} index of {meta['count']} vectors to {args.out}: {meta['index_bytes'] / 2**20:.1f} MiB "
          f"(exact flat: {meta['flat_bytes'] / 2**20:.1f} MiB)" + (f", recall@10 {meta['recall_at_10']:.4f} against exact search"
                                                   if meta.get("recall_at_10") is not None else "")
          + f" in {meta['build_s']:.0f}s")
    print(f"serve it with: negatron serve --model {meta['model']['path']} --index {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from negatron.trainers import onnx_backend

    out = Path(args.out)
    dest, check = onnx_backend.prepare(args.model, args.quantize, args.dev, out=out)
    size = (dest / "model.onnx").stat().st_size / 2**20
    line = f"wrote {dest / 'model.onnx'} ({size:.1f} MiB, {args.quantize if args.quantize != 'none' else 'fp32'})"
    if check.get("check") == "dev":
        line += f"; dev MRR@10 {check['mrr@10_fp32']:.4f} (fp32) -> {check['mrr@10_int8']:.4f} (int8)"
    elif check:
        line += f"; cosine to fp32 mean {check['cosine_mean']:.4f}, min {check['cosine_min']:.4f}"
    print(line)
    print(f"serve the same model on ONNX Runtime with: negatron serve --model {args.model} "
          f"serve.encoder.backend=onnx" + (" serve.encoder.quantize=int8" if args.quantize == "int8" else ""))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .jobs import submit

    return submit(args.kind, args.address, args.config, args.overrides, wait=not args.no_wait)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .jobs import jobs

    return jobs(args.action, args.address, args.job_id)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from . import multinode

    if args.action == "up":
        st = multinode.up(args.workers, args.cpus_per_node)
        print(f"cluster up: head {st['address']} + {st['workers']} worker node(s), {st['cpus_per_node']:g} CPUs each")
        print(f"  jobs/dashboard: {st['dashboard']}")
        print(f"  negatron submit train --address {st['dashboard']} --config configs/quickstart.yaml")
        print(f"  token (for ray CLI / other clients): export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={st['token_path']}")
        print("  stop it with: negatron cluster down")
    elif args.action == "down":
        multinode.down()
    else:
        print(multinode.status())
    return 0


def _torch_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``negatron eval: error: argument --batch-size: ...``, exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


POS, NONNEG = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="negatron", description="Distributed contrastive representation learning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    ds = dsub.add_parser("stdlib", help="code-search pairs from the installed Python standard library")
    ds.add_argument("--out", required=True, help="output folder")
    ds.add_argument("--seed", type=NONNEG, default=0, help="split seed (default 0)")
    ds.set_defaults(func=_cmd_data)
    dy = dsub.add_parser("pycode", help="code-search pairs from the third-party packages installed with Negatron "
                                        "(numpy, torch, transformers, ray, pyarrow, ...)")
    dy.add_argument("--out", required=True, help="output folder")
    dy.add_argument("--seed", type=NONNEG, default=0, help="split seed (default 0)")
    dy.set_defaults(func=_cmd_data)
    dp = dsub.add_parser("prepare", help="rewrite JSONL/CSV/Parquet pairs into Parquet shards that stream well")
    dp.add_argument("--in", dest="inputs", nargs="+", required=True,
                    help="input files (.jsonl/.json, .csv, .parquet; paths or URIs) with query, positive "
                         "[, query_id, positive_id, negatives, negative_ids]")
    dp.add_argument("--out", required=True, help="output folder or URI prefix (part-00000.parquet, ...)")
    dp.add_argument("--rows-per-file", type=POS, default=1_000_000, help="pairs per output file (default 1000000)")
    dp.add_argument("--row-group-rows", type=POS, default=8192,
                    help="pairs per Parquet row group, the unit a training worker reads (default 8192)")
    dp.set_defaults(func=_cmd_prepare)
    dd = dsub.add_parser("digits", help="scikit-learn's bundled handwritten digits as image Parquet (no download)")
    dd.add_argument("--out", required=True, help="output folder")
    dd.add_argument("--seed", type=NONNEG, default=0, help="split seed (default 0)")
    dd.set_defaults(func=_cmd_digits)

    e = sub.add_parser("eval", help="retrieval metrics of a bi-encoder (or k-NN/probe accuracy of an image encoder)")
    e.add_argument("--model", required=True, help="Hugging Face folder, Negatron checkpoint or run folder, or 'default'; "
                                                   "an image encoder folder, or 'cnn' for a random-init one")
    e.add_argument("--data", required=True, help="folder with queries/corpus/qrels.parquet (images: train/test.parquet)")
    e.add_argument("--shots", type=NONNEG, default=5, help="images: labelled images per class of the few-shot probe")
    e.add_argument("--out", help="write metrics JSON here")
    e.add_argument("--batch-size", type=POS, default=64)
    e.add_argument("--max-length", type=POS, default=None, help="truncate texts to this many tokens")
    e.add_argument("--threads", type=POS, default=None, help="torch threads")
    e.add_argument("--reranker", help="cross-encoder folder: rerank the bi-encoder's top --rerank-depth, report both stages")
    e.add_argument("--rerank-depth", type=POS, default=50, help="candidates the reranker reorders (default 50)")
    e.add_argument("--rerank-weight", type=float, default=None,
                   help="fuse reranker and bi-encoder scores: w*z(reranker) + (1-w)*z(bi-encoder), w in [0, 1] "
                        "(default: the weight saved in the reranker's negatron_rerank.json, else 1 = reranker alone)")
    e.add_argument("--actors", type=NONNEG, default=None,
                   help="embed the corpus with the Ray Data pipeline of `negatron embed` on this many actors "
                        "(0 = in this process; default: the pipeline with 2 actors above 100000 docs)")
    e.add_argument("--cpus-per-actor", type=float, default=1.0, help="pipeline: Ray CPUs per actor (default 1)")
    e.add_argument("--gpus-per-actor", type=float, default=0.0, help="pipeline: GPUs per actor (default 0)")
    e.add_argument("--index-kind", choices=["flat", "hnsw", "ivf", "ivfpq"], default="flat",
                   help="pipeline: the index searched (default flat: exact)")
    e.add_argument("--index", help="score against this index artifact (`negatron index build`) of the same model, "
                                   "not a fresh embedding of the corpus")
    e.add_argument("--work", help="pipeline: keep embeddings and index here (resumable; default a temp folder)")
    e.add_argument("--address", help="pipeline: Ray cluster address (default: an embedded local Ray)")
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("train", help="contrastive training on Ray Train")
    t.add_argument("--config", help="YAML config file (defaults when omitted)")
    t.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    t.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. loss.temperature=0.05")
    t.set_defaults(func=_cmd_train)

    tu = sub.add_parser("tune", help="hyperparameter search with Ray Tune (the config's tune: section)")
    tu.add_argument("--config", help="YAML config file with a tune: section")
    tu.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    tu.add_argument("overrides", nargs="*", help="a.b=value overrides")
    tu.set_defaults(func=_cmd_tune)

    mi = sub.add_parser("mine", help="mine hard negatives for a pairs file with a bi-encoder and faiss")
    mi.add_argument("--model", required=True, help="bi-encoder folder, Negatron run folder, or 'default'")
    mi.add_argument("--data", required=True, help="pairs Parquet (query, positive, query_id, positive_id)")
    mi.add_argument("--out", required=True, help="output pairs Parquet with negatives / negative_ids columns")
    mi.add_argument("--corpus", help="candidate pool Parquet (doc_id, text); default: the distinct positives")
    mi.add_argument("--k", type=POS, default=50, help="faiss candidates per query (default 50)")
    mi.add_argument("--skip", type=NONNEG, default=3, help="skip the best N non-positive candidates (default 3)")
    mi.add_argument("--take", type=POS, default=30, help="then keep up to N (default 30)")
    mi.add_argument("--margin", type=float, default=None,
                    help="drop candidates scoring above (positive score - margin): likely false negatives")
    mi.add_argument("--max-length", type=POS, default=128)
    mi.add_argument("--workers", type=POS, default=2, help="Ray embedding actors (default 2)")
    mi.add_argument("--cpus-per-worker", type=_positive_float, default=1.0)
    mi.add_argument("--batch-size", type=POS, default=64)
    mi.add_argument("--with-texts", action="store_true",
                    help="also write the negatives' texts (a 'negatives' column; the file grows ~take times)")
    mi.add_argument("--index-kind", choices=["auto", "flat", "ivfpq"], default="auto",
                    help="index over the candidates (auto: exact up to 2M, else ivfpq)")
    mi.add_argument("--work", help="keep embeddings and the index here (rerun to resume; default: a temp folder)")
    mi.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    mi.set_defaults(func=_cmd_mine)

    em = sub.add_parser("embed", help="embed a corpus with a pool of Ray actors into Parquet shards (Ray Data)")
    em.add_argument("--model", required=True, help="bi-encoder folder, Negatron run folder, URI, or 'default'")
    em.add_argument("--data", required=True, help="corpus Parquet file, folder or URI (doc_id, text)")
    em.add_argument("--out", required=True, help="output folder or URI (shards/, manifest.json); rerun to resume")
    em.add_argument("--actors", type=POS, default=2, help="embedding actors, each loads the model once (default 2)")
    em.add_argument("--cpus-per-actor", type=_positive_float, default=1.0, help="CPUs (and torch threads) per actor")
    em.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    em.add_argument("--batch-size", type=POS, default=64, help="texts per forward pass (sorted by token count)")
    em.add_argument("--max-length", type=NONNEG, default=0, help="token limit (default: the model's)")
    em.add_argument("--shard-rows", type=POS, default=4096, help="docs per output shard (the unit of resume)")
    em.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    em.set_defaults(func=_cmd_embed)

    ex = sub.add_parser("export", help="export a bi-encoder or cross-encoder to ONNX (optionally int8, quality-checked)")
    ex.add_argument("--model", required=True, help="bi-encoder or cross-encoder folder, Negatron run folder, or 'default'")
    ex.add_argument("--backend", choices=["onnx"], default="onnx", help="the export format (onnx)")
    ex.add_argument("--quantize", choices=["none", "int8"], default="none",
                    help="int8: dynamic quantization, refused when it loses quality against fp32")
    ex.add_argument("--dev", help="an eval folder (queries, corpus, qrels): judge int8 by dev MRR@10 "
                                  "(default: cosine to fp32 on calibration texts)")
    ex.add_argument("--out", required=True, help="output folder (model.onnx, tokenizer, negatron_onnx.json)")
    ex.set_defaults(func=_cmd_export)

    ix = sub.add_parser("index", help="faiss index artifacts from `negatron embed` output")
    ixsub = ix.add_subparsers(dest="index_command", required=True)
    ib = ixsub.add_parser("build", help="build an index (flat, hnsw, ivf, ivfpq) shard by shard, with its doc ids and texts")
    ib.add_argument("--embeddings", required=True, help="a `negatron embed` output folder or URI")
    ib.add_argument("--kind", required=True, choices=["flat", "hnsw", "ivf", "ivfpq"])
    ib.add_argument("--out", required=True, help="artifact folder or URI (index.faiss, docs.arrow, index.json)")
    ib.add_argument("--corpus", help="where the texts are (default: the corpus the embeddings were made from)")
    ib.add_argument("--nlist", type=NONNEG, default=0, help="ivf/ivfpq lists (default about 4*sqrt(N))")
    ib.add_argument("--nprobe", type=NONNEG, default=0, help="ivf/ivfpq lists scanned per search (default 16 / 32)")
    ib.add_argument("--pq-m", type=NONNEG, default=0, help="ivfpq bytes per vector (must divide the dimension; default D/4)")
    ib.add_argument("--refine", type=NONNEG, default=0,
                    help="ivfpq: re-score refine*k candidates from float16 vectors on disk (default 10; 1 = off)")
    ib.add_argument("--hnsw-m", type=NONNEG, default=0, help="hnsw neighbours per node (default 32)")
    ib.add_argument("--ef-search", type=NONNEG, default=0, help="hnsw candidates per search (default 64)")
    ib.add_argument("--train-size", type=NONNEG, default=0, help="vectors ivf/ivfpq train on (default 40 per list, at most 128 MiB of them)")
    ib.add_argument("--eval-queries", type=NONNEG, default=1000, help="held-out queries for the recall@10 report (0 = none)")
    ib.add_argument("--seed", type=NONNEG, default=0)
    ib.set_defaults(func=_cmd_index)

    sv = sub.add_parser("serve", help="serve encoders, a reranker and search over HTTP with Ray Serve",
                        usage="negatron serve [build] [--config FILE] [--model PATH] [...] [a.b=value ...]",
                        description="`negatron serve` runs the API until Ctrl-C; `negatron serve build -o serve.yaml` "
                                    "writes a Ray Serve config for `serve run` / `serve deploy` / KubeRay.")
    sv.add_argument("--config", help="YAML config with a serve: section (defaults when omitted)")
    sv.add_argument("--model", help="bi-encoder folder, Negatron run folder, or 'default' (serve.encoder.path)")
    sv.add_argument("--reranker", help="cross-encoder folder (serve.reranker.path)")
    sv.add_argument("--corpus", help="corpus Parquet with doc_id, text for /search (serve.retriever.corpus)")
    sv.add_argument("--index", help="index artifact from `negatron index build` for /search (serve.retriever.index_path)")
    sv.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    sv.add_argument("--api-key-env", help="require 'Authorization: Bearer <key>', the key read from this env var")
    sv.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    sv.add_argument("-o", "--output", help="with build: the Serve config file to write (default: stdout)")
    sv.add_argument("overrides", nargs="*", help="[build] then a.b=value overrides")
    sv.set_defaults(func=_cmd_serve)

    su = sub.add_parser("submit", help="run train/tune/serve/quickstart as a Ray job on a cluster (Jobs API)")
    su.add_argument("kind", choices=["train", "tune", "serve", "quickstart"])
    su.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265")
    su.add_argument("--config", help="YAML config (validated here before submitting)")
    su.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    su.add_argument("overrides", nargs="*", help="a.b=value overrides")
    su.set_defaults(func=_cmd_submit)

    jb = sub.add_parser("jobs", help="list / inspect / stop Ray jobs")
    jb.add_argument("action", choices=["list", "status", "logs", "stop"])
    jb.add_argument("job_id", nargs="?")
    jb.add_argument("--address", required=True, help="the cluster's dashboard URL")
    jb.set_defaults(func=_cmd_jobs)

    cl = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine")
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--workers", type=NONNEG, default=1, help="worker nodes besides the head (default 1)")
    cl.add_argument("--cpus-per-node", type=_positive_float, default=2, help="logical CPUs per node (default 2)")
    cl.set_defaults(func=_cmd_cluster)

    q = sub.add_parser("quickstart", help="the main job: data, zero-shot eval, fine-tune on Ray, eval")
    q.add_argument("--config", default=None, help="config (default: the packaged configs/quickstart.yaml)")
    q.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    q.add_argument("--threads", type=POS, default=None, help="torch threads for the driver's evaluations")
    q.add_argument("--with-reranker", action="store_true",
                   help="then mine hard negatives, train a cross-encoder reranker and evaluate both stages")
    q.add_argument("--reranker-steps", type=POS, default=300, help="reranker training steps (default 300)")
    q.add_argument("--rerank-depth", type=POS, default=20, help="test candidates the reranker reorders (default 20)")
    q.add_argument("--reranker-init", default=None,
                   help="start the reranker from this cross-encoder folder (default: the fine-tuned bi-encoder "
                        "with a fresh head, which needs far more steps than a CPU quickstart gives it)")
    q.add_argument("overrides", nargs="*", help="a.b=value overrides")
    q.set_defaults(func=_cmd_quickstart)
    for sp in sub.choices.values():
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="show everything Ray prints (by default its INFO chatter goes to ray.log in the run folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # a.b=value overrides may come after options too (argparse stops a positional list at the first option)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from . import console

    console.set_verbose(getattr(args, "verbose", False))
    console.quiet_libraries()
    if args.command in ("submit", "jobs"):
        from .jobs import auth_env_for

        auth_env_for(args.address)  # Ray reads its auth mode once, at import: set it first
    try:
        return args.func(args)
    except (NegatronError, OSError) as e:
        if os.environ.get("NEGATRON_DEBUG"):
            raise
        print(f"negatron: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("train", "tune", "quickstart")
        print("negatron: interrupted" + ("; run the same command again to resume from the last checkpoint"
                                         if resumable else ""), file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """An error as one line: OSErrors name the file and the reason; others keep their first lines
    (config errors list one bad key per line, which stays readable)."""
    if isinstance(e, OSError) and not isinstance(e, (ConfigError,)) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    text = str(e).strip()
    return text if text.count("\n") < 25 else "\n".join(text.splitlines()[:25]) + "\n  ..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

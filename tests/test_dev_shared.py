"""Dev checks shared by the training workers (no Ray: two gloo processes).

Each worker embeds 1/N of the dev subsample; rank 0 gathers the rows and scores. The result must
equal one process scoring everything; a worker left waiting past the process group's timeout gets
one clear line, not gloo's message.
"""

import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import write_synthetic_task


def _init(rank, world, init_file, timeout_s=120):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def _spawn(target, tmp_path, *args, world=2):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, str(tmp_path / "pg"), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    return [p.exitcode for p in procs]


def _gather_worker(rank, world, init_file, out_dir):
    from negatron.trainers import distributed as D

    _init(rank, world, init_file)
    try:
        counts = [5, 0, 3][:world]  # a rank with no rows still takes part
        x = np.full((counts[rank], 4), rank + 1, dtype=np.float32) + np.arange(counts[rank], dtype=np.float32)[:, None]
        old = D.GATHER_ROWS_BLOCK
        D.GATHER_ROWS_BLOCK = 2  # several blocks, padded
        got = D.gather_rows(x, counts)
        D.GATHER_ROWS_BLOCK = old
        np.save(os.path.join(out_dir, f"g{rank}.npy"), np.zeros(0) if got is None else got)
        open(os.path.join(out_dir, f"g{rank}.none"), "w").write(str(got is None))
    finally:
        dist.destroy_process_group()


def test_gather_rows_uneven_counts_in_rank_order(tmp_path):
    assert _spawn(_gather_worker, tmp_path, str(tmp_path), world=3) == [0, 0, 0]
    got = np.load(tmp_path / "g0.npy")
    want = np.concatenate([np.full((5, 4), 1) + np.arange(5)[:, None], np.full((3, 4), 3) + np.arange(3)[:, None]])
    np.testing.assert_array_equal(got, want)
    assert [(tmp_path / f"g{r}.none").read_text() for r in range(3)] == ["False", "True", "True"]


def _dev_worker(rank, world, init_file, model_dir, dev_dir, out_dir):
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import DevRetrieval

    _init(rank, world, init_file)
    try:
        enc = Encoder.from_pretrained(model_dir)
        m = DevRetrieval(dev_dir, max_queries=30, max_docs=50, batch_size=8).evaluate(enc)
        torch.save({"m": m}, os.path.join(out_dir, f"d{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shared_dev_check_equals_one_process(tmp_path, tiny_model_dir):
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import DevRetrieval, evaluate_encoder

    dev = str(write_synthetic_task(tmp_path / "task", n_dev=60, n_distract=80) / "dev")
    assert _spawn(_dev_worker, tmp_path, str(tiny_model_dir), dev, str(tmp_path)) == [0, 0]
    shared = torch.load(tmp_path / "d0.pt", weights_only=False)["m"]
    assert torch.load(tmp_path / "d1.pt", weights_only=False)["m"] is None  # rank 1 embeds, rank 0 scores
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    alone = DevRetrieval(dev, max_queries=30, max_docs=50, batch_size=8).evaluate(enc)
    direct = evaluate_encoder(enc, dev, batch_size=8, max_queries=30, max_docs=50, progress=False)
    assert shared["num_docs"] == alone["num_docs"] == direct["num_docs"] == 50
    for k in ("mrr@10", "recall@10", "ndcg@10", "recall@100"):
        assert shared[k] == pytest.approx(alone[k], abs=1e-9) and alone[k] == pytest.approx(direct[k], abs=1e-9)


def test_dev_subsample_is_seeded_and_keeps_every_judged_doc(tmp_path):
    from negatron.trainers.evaluate import _subset
    from negatron.trainers.schema import check_eval_dir

    data = check_eval_dir(write_synthetic_task(tmp_path / "t", n_dev=60, n_distract=200) / "dev")
    a = _subset(data, 20, 50)
    b = _subset(data, 20, 50)
    assert a[0] == b[0] and a[2] == b[2]  # the same rows every time
    qids, _, doc_ids, docs, qrels = a
    assert len(qids) == 20 and len(doc_ids) == len(docs) == 50
    judged = {d for q in qids for d in qrels[q]}
    assert judged <= set(doc_ids)
    assert qids != [f"q{i}" for i in range(200, 220)]  # drawn, not the first 20
    all_q, _, all_docs, _, _ = _subset(data, 0, 0)
    assert len(all_q) == 60 and len(all_docs) == 260


def _timeout_worker(rank, world, init_file, model_dir, train, out_dir):
    from negatron.cluster.config import load_config
    from negatron.trainers.loop import CollectiveTimeout, run_worker

    _init(rank, world, init_file, timeout_s=3)
    if rank == 1:  # a stalled worker: never reaches its first collective before rank 0 gives up
        time.sleep(12)
        os._exit(0)
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={train}", "trainer.batch_size=4",
                             "model.max_length=16", "trainer.max_steps=2", "trainer.collective_timeout_s=10"])
    try:
        run_worker(cfg, rank, world, lambda m, d: None, log=lambda s: None)
        msg = "no error"
    except CollectiveTimeout as e:
        msg = str(e)
    open(os.path.join(out_dir, "timeout.txt"), "w").write(msg)
    os._exit(0)


def test_a_stalled_worker_gives_one_clear_line(tmp_path, tiny_model_dir):
    from tests.helpers import write_pairs

    train = write_pairs(tmp_path / "p.parquet", n=32)
    _spawn(_timeout_worker, tmp_path, str(tiny_model_dir), str(train), str(tmp_path))
    msg = (tmp_path / "timeout.txt").read_text()
    assert "trainer.collective_timeout_s = 10 s" in msg and "worker 0" in msg, msg
    assert "\n" not in msg

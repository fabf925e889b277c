"""2 gloo processes × batch B == 1 process × batch 2B: loss, gradients and bank (no Ray)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import make_tiny_encoder

B = 4
STEPS = 3


def _batches(with_negatives: bool):
    """STEPS global batches of 2B rows; row 1 and row 6 share a positive id (a duplicate)."""
    out = []
    for s in range(STEPS):
        g = {
            "query": [f"query {s} number {i} about sorting" for i in range(2 * B)],
            "positive": [f"def f{s}_{i}(x): return sorted(x)[{i}]" for i in range(2 * B)],
            "pos_ids": torch.tensor([100 * s + i for i in range(2 * B)], dtype=torch.long),
        }
        g["pos_ids"][6] = g["pos_ids"][1]
        # rows 2 (rank 0) and 5 (rank 1) are two positives of one query: never each other's negative
        g["query_ids"] = torch.tensor([7000 + 100 * s + i for i in range(2 * B)], dtype=torch.long)
        g["query_ids"][5] = g["query_ids"][2]
        if with_negatives:
            g["negatives"] = [f"def g{s}_{i}(y): return y + {i}" for i in range(2 * B)]
            g["neg_ids"] = torch.tensor([10_000 + 100 * s + i for i in range(2 * B)], dtype=torch.long)
            g["neg_ids"][3] = g["pos_ids"][3]  # a hard negative that is the positive itself: masked
            g["neg_valid"] = torch.ones(2 * B, dtype=torch.bool)
            g["neg_valid"][5] = False
        out.append(g)
    return out


def _slice(g, lo, hi):
    return {k: (v[lo:hi]) for k, v in g.items()}


def _model(state, kwargs):
    from negatron.trainers.step import ContrastiveModel

    enc = make_tiny_encoder(seed=0)
    enc.load_state_dict(state)
    if kwargs.get("guide"):  # GISTEmbed: the same frozen guide on every rank
        kwargs = {**kwargs, "guide": make_tiny_encoder(seed=7)}
    model = ContrastiveModel(enc, **kwargs)
    model.eval()  # no dropout, so both runs are deterministic
    return model


def _prefill(model, lo, hi):
    """Prefill the bank with 2B keys, rows [lo, hi) here; one id equals a step-0 positive's id."""
    texts = [f"def h{i}(x): return x * {i}" for i in range(2 * B)]
    ids = torch.tensor([500 + i for i in range(2 * B)], dtype=torch.long)
    ids[5] = 2  # the positive id of step 0's row 2: masked for that query
    model.prefill_bank(texts[lo:hi], ids[lo:hi])


def _run(model, batches, lo, hi, prefill=False):
    """Run STEPS steps of SGD; returns per-step (loss, flat grads) and bank checksums."""
    from negatron.trainers import distributed as D

    if prefill:
        _prefill(model, lo, hi)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    # as the trainer does: plain at step 0, then buckets (tiny here: several per step) all-reduced
    # while backward runs
    reducer = D.GradReducer(model.trainable_parameters(), bucket_mb=0.02)
    losses, grads, sums = [], [], []
    for s, g in enumerate(batches):
        opt.zero_grad()
        loss, state = model.forward_backward(_slice(g, lo, hi), step=s, before_last_backward=reducer.arm)
        reducer.finish()
        mean_loss = loss.detach().clone()
        if D.is_distributed():
            dist.all_reduce(mean_loss)
            mean_loss /= D.world_size()
        losses.append(float(mean_loss))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.trainable_parameters() if p.grad is not None]))
        opt.step()
        model.after_step(state, s)
        sums.append(model.bank.checksum() if model.bank is not None else "")
    return losses, grads, sums


CASES = {
    "in-batch": dict(temperature=0.1),
    "bank-wrap-maxage-joint": dict(temperature=0.1, bank_size=10, bank_max_age=1, bank_mode="joint"),
    "bank-momentum-symmetric-learnable": dict(temperature=0.1, bank_size=7, bank_momentum=0.9,
                                               symmetric=True, learnable_temperature=True),
    "moco-mode-momentum": dict(temperature=0.1, bank_size=12, bank_momentum=0.9, bank_mode="moco"),
    "moco-prefilled-wrap": dict(temperature=0.1, bank_size=13, bank_momentum=0.9, bank_mode="moco", prefill=True),
    # the cached step (mini-batches of 3 of each worker's 4 rows) against one plain pass over 2B
    # GISTEmbed: the guide's embeddings gathered like the candidates (it masks 1/8 of the in-batch
    # candidates here), its bank queue prefilled too
    "gist-guide-moco-prefilled": dict(temperature=0.1, bank_size=13, bank_momentum=0.9, guide=True, guide_margin=0.0,
                                      prefill=True),
    "gradcache-moco-symmetric-learnable": dict(temperature=0.1, bank_size=12, bank_momentum=0.9, bank_mode="moco",
                                               symmetric=True, learnable_temperature=True, mini_batch_size=3),
}


def _spawn_two(target, tmp_path, *args):
    """Run ``target(rank, 2, init_file, *args)`` in two gloo processes; their r{rank}.pt results."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, 2, str(tmp_path / "pg"), *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]


def _jobs() -> list[tuple[str, dict, bool]]:
    """(name, model kwargs, with hard negatives) of every two-rank run the tests below check."""
    jobs = [(f"{case}-{wn}", CASES[case], wn) for case in CASES for wn in (False, True)]
    jobs += [(f"local-{m}", dict(temperature=0.1, bank_size=12, bank_momentum=m, cross_worker=False,
                                 bank_mode="joint"), False) for m in (0.0, 0.9)]
    return jobs


def _all_worker(rank, world, init_file, state, out_dir):
    """Every job in one process group, one after the other in the same order on both ranks (spawning
    two processes that import torch and transformers costs ~10 s here; the jobs take ~1 s)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for name, kwargs, with_negatives in _jobs():
            kwargs = dict(kwargs)
            prefill = kwargs.pop("prefill", False)
            model = _model(state, kwargs)
            losses, grads, sums = _run(model, _batches(with_negatives), rank * B, (rank + 1) * B, prefill)
            out[name] = {"losses": losses, "grads": grads, "sums": sums}
            if model.bank is not None:
                out[name]["qids"] = model.bank.qids.clone()
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The results of every job on rank 0 and rank 1 (one spawn for the module)."""
    tmp = tmp_path_factory.mktemp("gloo")
    return _spawn_two(_all_worker, tmp, make_tiny_encoder(seed=0).state_dict(), str(tmp))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bank_stays_shared_without_cross_worker_negatives(momentum, two_ranks):
    """loss.cross_worker_negatives=false scores local candidates only, but every rank still
    enqueues every rank's keys: the bank is identical on both ranks after every step."""
    r0, r1 = (r[f"local-{momentum}"] for r in two_ranks)
    assert r0["sums"] == r1["sums"] and len(set(r0["sums"])) == STEPS
    assert (r0["qids"] >= 0).sum() == 12  # both ranks' rows were enqueued, with their query groups


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_equal_one_big_batch(case, with_negatives, two_ranks):
    kwargs = dict(CASES[case])
    prefill = kwargs.pop("prefill", False)
    state = make_tiny_encoder(seed=0).state_dict()
    plain = {k: v for k, v in kwargs.items() if k != "mini_batch_size"}  # the reference: one pass
    ref_losses, ref_grads, ref_sums = _run(_model(state, plain), _batches(with_negatives), 0, 2 * B, prefill)
    r0, r1 = (r[f"{case}-{with_negatives}"] for r in two_ranks)
    for s in range(STEPS):
        assert r0["losses"][s] == pytest.approx(ref_losses[s], abs=1e-5)
        torch.testing.assert_close(r0["grads"][s], ref_grads[s], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["grads"][s], ref_grads[s], atol=1e-5, rtol=1e-4)
    # the bank is identical on both ranks after every step
    assert r0["sums"] == r1["sums"]
    if kwargs.get("bank_size"):
        # the keys may differ from the reference by float rounding, so compare only ranks here
        assert len(set(r0["sums"])) == STEPS

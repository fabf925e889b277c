"""Inference batching without Ray: padding-aware chunks, the encoder's use of them, load-aware waits."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from negatron.serve.deployments import LoadAwareWait
from negatron.trainers.encoder import Encoder, plan_chunks


def _cost(lengths, chunks, fc):
    return sum(fc + (e - s) * lengths[s] for s, e in chunks)


def _brute_force(lengths, max_chunk, fc):
    n, best = len(lengths), None
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        if all(e - s <= max_chunk for s, e in chunks):
            c = _cost(lengths, chunks, fc)
            best = c if best is None else min(best, c)
    return best


def test_chunks_cover_in_order_within_the_cap():
    rng = random.Random(0)
    for _ in range(50):
        n, cap = rng.randint(1, 40), rng.randint(1, 12)
        lengths = np.array(sorted((rng.randint(3, 128) for _ in range(n)), reverse=True))
        chunks = plan_chunks(lengths, cap, rng.choice([0, 8, 32, 1e6]))
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(0 < e - s <= cap for s, e in chunks)


def test_chunks_are_optimal_for_the_cost_model():
    rng = random.Random(1)
    for _ in range(30):
        n, cap, fc = rng.randint(1, 10), rng.randint(1, 6), rng.choice([0, 5, 32])
        lengths = np.array(sorted((rng.randint(3, 100) for _ in range(n)), reverse=True))
        assert _cost(lengths, plan_chunks(lengths, cap, fc), fc) == pytest.approx(_brute_force(lengths, cap, fc))


def test_chunk_shapes():
    assert plan_chunks(np.array([]), 8, 32) == []
    assert len(plan_chunks(np.full(10, 20), 4, 32)) == 3  # equal lengths: as few passes as the cap allows
    # one long text among short ones runs alone instead of padding the others to 120
    assert plan_chunks(np.array([120, 12, 11, 10, 10, 9]), 32, 32) == [(0, 1), (1, 6)]
    # a pass that costs a lot keeps everything together
    assert plan_chunks(np.array([120, 12, 11]), 32, 1e6) == [(0, 3)]


def test_encode_matches_one_text_at_a_time(tiny_model_dir):
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    texts = ["a", "def f(x): return x + 1 " * 6, "import os", "b c d e f g h i j k l m n o p q r s t u v w",
             "x", "class A:\n    pass", "y" * 40]
    together = enc.encode(texts, batch_size=4)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert enc.token_lengths(texts).tolist() == [len(x) for x in enc.tokenizer(texts, truncation=True,
                                                                               max_length=enc.max_length)["input_ids"]]
    assert enc.encode([]).shape == (0, enc.dim)


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_pads_each_pass_as_the_tokenizer_does(tiny_model_dir, side):
    import torch

    enc = Encoder.from_pretrained(str(tiny_model_dir)).eval()
    enc.tokenizer.padding_side = side
    texts = ["a", "def f(x): return x + 1 " * 6, "import os", "x y z"]
    want = enc.tokenizer(texts, padding=True, truncation=True, max_length=8, return_tensors="pt")
    got = enc._pad(enc.tokenizer(texts, truncation=True, max_length=8), np.arange(len(texts)))
    assert set(got) == set(want.keys())
    for k in got:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        direct = enc.encode_batch(texts, 8).numpy()
    np.testing.assert_allclose(enc.encode(texts, batch_size=64, max_length=8), direct, atol=1e-6)


class _Handler:
    def __init__(self):
        self.waits, self.sizes = [], []

    def set_batch_wait_timeout_s(self, s):
        self.waits.append(s)

    def set_max_batch_size(self, n):
        self.sizes.append(n)


def test_load_aware_wait():
    h = _Handler()
    w = LoadAwareWait(h, 0.05, max_batch=2)
    with w:  # alone: a batch of one, at once
        assert w.in_flight == 1
        with w:  # another request in flight: wait for both
            with w:  # three in flight: capped at max_batch
                pass
    assert h.waits == [0.0, 0.05, 0.05] and h.sizes == [1, 2, 2] and w.in_flight == 0
    with pytest.raises(RuntimeError):
        with w:
            raise RuntimeError("the batch failed")
    assert w.in_flight == 0  # counted down on errors too


def test_coalescer_sends_at_once_when_idle_and_groups_while_busy():
    import asyncio

    from negatron.serve.deployments import Coalescer

    sent, live, peak = [], [0], [0]

    async def send(items):
        sent.append(list(items))
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.05)
        live[0] -= 1
        if "bad" in items:
            raise RuntimeError("downstream failed")
        return [f"r-{x}" for x in items]

    async def main():
        c = Coalescer(send, slots=2, max_items=4)
        assert await c("solo") == "r-solo" and sent == [["solo"]]  # idle: no waiting for company
        sent.clear()
        got = await asyncio.gather(*(c(i) for i in range(11)))
        assert got == [f"r-{i}" for i in range(11)]  # each caller gets its own result
        # two slots: the first two go alone, then the queued ones go at most 4 per call
        assert sent[:2] == [[0], [1]] and all(len(b) <= 4 for b in sent) and len(sent) < 11
        assert sorted(x for b in sent for x in b) == list(range(11)) and peak[0] == 2
        sent.clear()
        c1 = Coalescer(send, slots=1, max_items=8)
        res = await asyncio.gather(c1("a"), c1("bad"), c1("c"), return_exceptions=True)
        assert res[0] == "r-a" and sent == [["a"], ["bad", "c"]]
        assert all(isinstance(r, RuntimeError) for r in res[1:])  # the failed call's callers only
        assert await c1("d") == "r-d" and c1.active == 0 and not c1.pending  # still serving

    asyncio.run(main())
    with pytest.raises(ValueError):
        Coalescer(send, slots=0, max_items=4)


def test_per_model_runs_each_model_once_and_returns_each_items_rows():
    import asyncio

    from negatron.serve.deployments import per_model

    calls = []

    async def embed(name, flat):
        calls.append((name, list(flat)))
        return np.array([[ord(name), x] for x in flat])  # one row per input, tagged by model

    items = [("a", [1, 2]), ("b", [3]), ("a", [4]), ("b", [5, 6, 7])]
    out = asyncio.run(per_model(items, embed))
    assert sorted(calls) == [("a", [1, 2, 4]), ("b", [3, 5, 6, 7])]  # one call per model
    for (name, inputs), rows in zip(items, out):
        assert rows.tolist() == [[ord(name), x] for x in inputs]

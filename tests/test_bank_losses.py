import pytest
import torch
from safetensors.torch import load_file, save_file

from negatron.trainers.augment import TextAugmenter
from negatron.trainers.bank import MemoryBank
from negatron.trainers.data import PairStream, stable_id
from negatron.trainers.losses import Temperature, info_nce, same_id_mask


def test_bank_wraparound_and_pointer():
    bank = MemoryBank(size=5, dim=2)
    keys = torch.arange(6, dtype=torch.float32).repeat(2, 1).T  # 6×2, rows i,i
    bank.enqueue(keys[:3], torch.tensor([0, 1, 2]), step=0)
    assert int(bank.ptr) == 3 and bank.fill() == 3
    bank.enqueue(keys[3:6], torch.tensor([3, 4, 5]), step=1)  # wraps: slot 0 gets id 5
    assert int(bank.ptr) == 1
    assert bank.ids.tolist() == [5, 1, 2, 3, 4]
    assert bank.steps.tolist() == [1, 0, 0, 1, 1]
    assert bank.keys[0].tolist() == [5.0, 5.0]
    # more keys than slots: only the last K are kept, in order
    big = torch.arange(12, dtype=torch.float32)[:, None].repeat(1, 2)
    bank.enqueue(big, torch.arange(12), step=2)
    assert sorted(bank.ids.tolist()) == [7, 8, 9, 10, 11]
    # FIFO order from the pointer
    order = [(int(bank.ptr) + i) % 5 for i in range(5)]
    assert [int(bank.ids[i]) for i in order] == [7, 8, 9, 10, 11]


def test_bank_max_age_and_validation():
    bank = MemoryBank(size=4, dim=1, max_age=2)
    bank.enqueue(torch.ones(2, 1), torch.tensor([1, 2]), step=0)
    bank.enqueue(torch.ones(1, 1), torch.tensor([3]), step=3)
    assert bank.valid(3).tolist() == [False, False, True, False]  # age 3 > 2; slot 3 empty
    assert bank.valid(2).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="size"):
        MemoryBank(0, 4)
    with pytest.raises(ValueError, match="keys must be"):
        bank.enqueue(torch.ones(2, 3), torch.tensor([1, 2]), step=1)


def test_bank_checkpoint_round_trip_bit_for_bit(tmp_path):
    bank = MemoryBank(size=7, dim=3, max_age=5)
    g = torch.Generator().manual_seed(0)
    for s in range(4):
        bank.enqueue(torch.randn(3, 3, generator=g), torch.randint(0, 100, (3,), generator=g), step=s)
    save_file(bank.state_dict(), str(tmp_path / "bank.safetensors"))
    back = MemoryBank(size=7, dim=3, max_age=5)
    back.load_state_dict(load_file(str(tmp_path / "bank.safetensors")))
    for name, t in bank.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    assert back.checksum() == bank.checksum()


def test_id_masking_removes_exactly_matching_entries():
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    ids = torch.tensor([10, 11])
    bank_keys = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    bank_ids = torch.tensor([10, 99, 11, 98])
    mask = same_id_mask(ids, bank_ids)
    assert mask.tolist() == [[True, False, False, False], [False, False, True, False]]
    scale = torch.tensor(10.0)
    got = info_nce(q, pos, ids, scale, bank_keys=bank_keys, bank_ids=bank_ids)
    # reference: query 0 sees pos0, pos1, bank[1], bank[2], bank[3]; query 1 sees pos0, pos1, bank[0,1,3]
    ref = 0.0
    for i, keep in enumerate([[1, 2, 3], [0, 1, 3]]):
        cands = torch.cat([pos, bank_keys[keep]])
        ref += torch.nn.functional.cross_entropy((q[i:i + 1] @ cands.T) * scale, torch.tensor([i]))
    assert float(got) == pytest.approx(float(ref / 2), abs=1e-6)
    # the labelled positive itself is never masked even though its id matches
    dup = info_nce(q, pos, torch.tensor([7, 7]), scale)
    ref0 = torch.nn.functional.cross_entropy((q[0:1] @ pos[0:1].T) * scale, torch.tensor([0]))
    assert float(dup) == pytest.approx(float(ref0), abs=1e-6)  # each query only sees its own positive


def test_learnable_temperature_clamped_and_has_finite_grad():
    """The stored τ is clamped after an optimizer step (``clamp_``), not inside the forward pass."""
    t = Temperature(0.05, learnable=True, min_temperature=0.02)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    t.clamp_()
    assert t.value() == pytest.approx(0.02)
    t2 = Temperature(0.1, learnable=True)
    q = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(q, torch.randn(3, 4), torch.tensor([1, 1, 2]), t2.scale())
    loss.backward()
    assert torch.isfinite(t2.log_scale.grad)
    with pytest.raises(ValueError):
        Temperature(0.0)


def test_augmentations_deterministic_and_bounded():
    aug = TextAugmenter(mask_prob=0.3, delete_prob=0.2, crop=True, crop_min_ratio=0.5)
    texts = ["the quick brown fox jumps over the lazy dog again and again"] * 4
    a = aug(texts, seed=1, step=5, rank=0)
    assert a == aug(texts, seed=1, step=5, rank=0)
    assert a != aug(texts, seed=1, step=6, rank=0)
    for t in a:
        assert 1 <= len(t.split()) <= len(texts[0].split())
    assert TextAugmenter()(texts, 0, 0, 0) == texts
    with pytest.raises(ValueError):
        TextAugmenter(mask_prob=1.0)


def test_pair_stream_epoch_coverage_and_worker_equivalence(tmp_path):
    from tests.helpers import write_pairs
    import pyarrow.parquet as pq

    table = pq.read_table(write_pairs(tmp_path / "p.parquet", n=30))
    one = PairStream(table, batch_size=6, rank=0, world=1, seed=3)
    two = [PairStream(table, batch_size=3, rank=r, world=2, seed=3) for r in range(2)]
    seen = []
    for step in range(5):  # 5 × 6 = 30 rows = exactly one epoch
        rows_one = one.batch(step)["rows"].tolist()
        rows_two = two[0].batch(step)["rows"].tolist() + two[1].batch(step)["rows"].tolist()
        assert rows_one == rows_two
        seen += rows_one
    assert sorted(seen) == list(range(30))
    assert one.batch(7)["pos_ids"].tolist() == [stable_id(f"d{i}") for i in one.batch(7)["rows"]]


def test_prefill_rows_distinct_equal_shares_and_worker_equivalent(tmp_path):
    from tests.helpers import write_pairs
    import pyarrow.parquet as pq

    table = pq.read_table(write_pairs(tmp_path / "p.parquet", n=31))
    one = PairStream(table, batch_size=4, rank=0, world=1, seed=3)
    two = [PairStream(table, batch_size=2, rank=r, world=2, seed=3) for r in range(2)]
    rows = one.prefill_rows(20)
    assert len(rows) == 20 and len(set(rows.tolist())) == 20
    assert two[0].prefill_rows(20).tolist() + two[1].prefill_rows(20).tolist() == rows.tolist()
    # more slots than rows: every row once; with 2 workers the total rounds down to an even count
    assert sorted(one.prefill_rows(100).tolist()) == list(range(31))
    shares = [s.prefill_rows(100) for s in two]
    assert len(shares[0]) == len(shares[1]) == 15 and len(set(shares[0].tolist() + shares[1].tolist())) == 30
    texts, ids = two[1].prefill(20)
    assert ids.tolist() == [stable_id(f"d{i}") for i in two[1].prefill_rows(20)]
    assert texts == [table.column("positive")[int(i)].as_py() for i in two[1].prefill_rows(20)]
    assert PairStream(table, 4, seed=4).prefill_rows(20).tolist() != rows.tolist()  # seeded


def test_prefill_fills_the_bank_with_eval_mode_key_encoder_keys():
    from negatron.trainers.step import ContrastiveModel
    from tests.helpers import make_tiny_encoder

    torch.manual_seed(0)
    model = ContrastiveModel(make_tiny_encoder(seed=0), bank_size=6, bank_momentum=0.9, bank_max_age=3)
    model.train()
    texts = [f"def f{i}(x): return x + {i}" for i in range(4)]
    fill = model.prefill_bank(texts, torch.arange(10, 14), batch_size=3)
    assert fill == 4 and model.training and model.key_encoder.training  # modes restored
    assert model.bank.ids[:4].tolist() == [10, 11, 12, 13] and model.bank.steps[:4].tolist() == [0] * 4
    torch.testing.assert_close(model.bank.keys[:4], torch.from_numpy(model.key_encoder.encode(texts)))
    assert model.bank.valid(3)[:4].all() and not model.bank.valid(4)[:4].any()  # max_age counts from step 0
    with pytest.raises(ValueError, match="ids"):
        model.prefill_bank(texts, torch.arange(3))


def test_bank_filter_masks_keys_scoring_near_the_positive():
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[0.8, 0.6]])  # score 0.8
    bank = torch.tensor([[0.79, 0.61], [0.0, 1.0], [0.9, 0.43]])  # scores 0.79, 0.0, 0.9
    ids = torch.tensor([1])
    bank_ids = torch.tensor([2, 3, 4])
    scale = torch.tensor(10.0)
    got = info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids, bank_filter_ratio=0.95)
    # 0.79 > 0.95·0.8 = 0.76 and 0.9 > 0.76 are masked; only the 0.0 key remains a negative
    ref = torch.nn.functional.cross_entropy(torch.tensor([[0.8, 0.0]]) * scale, torch.tensor([0]))
    assert float(got) == pytest.approx(float(ref), abs=1e-6)
    assert float(info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids)) > float(got)


def test_moco_mode_scores_bank_against_the_key_positive():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    kpos = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    ids, bank_ids = torch.tensor([1, 2]), torch.tensor([2, 7, 8])  # bank[0] is query 1's positive
    scale = torch.tensor(5.0)
    got = info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids, bank_key_pos=kpos)
    ce = torch.nn.functional.cross_entropy
    in_batch = ce((q @ pos.T) * scale, torch.tensor([0, 1]))
    moco = (ce(torch.cat([q[0:1] @ kpos[0:1].T, q[0:1] @ bank.T], 1) * scale, torch.tensor([0]))
            + ce(torch.cat([q[1:2] @ kpos[1:2].T, q[1:2] @ bank[1:].T], 1) * scale, torch.tensor([0]))) / 2
    assert float(got) == pytest.approx(float(0.5 * (in_batch + moco)), abs=1e-6)
    # bank.weight w: in-batch + w × the bank term
    for w in (0.0, 1.0, 2.5):
        got_w = info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids, bank_key_pos=kpos, bank_weight=w)
        assert float(got_w) == pytest.approx(float(in_batch + w * moco), abs=1e-6)


def test_a_temperature_at_its_bound_still_learns_and_is_clamped_after_the_step():
    """At min_τ the gradient is not zero (no clamp in the forward pass), so an update that wants a
    larger τ moves it back off the bound; one that wants a smaller τ is clamped after the step."""
    t = Temperature(0.02, learnable=True, min_temperature=0.02)
    opt = torch.optim.SGD([t.log_scale], lr=0.5)
    (t.scale() * 0.01).backward()  # d/dlog_scale > 0: descending lowers the scale (raises τ)
    assert float(t.log_scale.grad) > 0
    opt.step()
    t.clamp_()
    assert 0.02 < t.value() < 0.05
    opt.zero_grad()
    (-t.scale() * 1e4).backward()  # wants a far smaller τ
    opt.step()
    t.clamp_()
    assert t.value() == pytest.approx(0.02)


def test_temperature_trains_at_its_own_learning_rate(tiny_model_dir):
    from negatron.cluster.config import load_config
    from negatron.trainers.loop import make_optimizer
    from negatron.trainers.tasks import task_for

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "loss.learnable_temperature=true", "optim.lr=1e-4",
                             "optim.temperature_lr=0.01", "bank.size=0", "bank.momentum=0"])
    model = task_for(cfg).build_model(cfg)
    opt, _ = make_optimizer(model, cfg)
    tau = [g for g in opt.param_groups if g.get("temperature")]
    assert len(tau) == 1 and tau[0]["lr"] == 0.01 and tau[0]["params"] == [model.temperature.log_scale]
    assert all(g["lr"] == 1e-4 for g in opt.param_groups if not g.get("temperature"))

"""Tune's pure pieces, without Ray running: RecheckASHA's bookkeeping (ASHA's arrival rule plus rungs
re-judged as they fill) and the per-trial memory estimate."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from negatron.cluster.config import Config
from negatron.tune.schedulers import RecheckASHA, below_cutoff, rung_milestones
from negatron.tune.search import _scheduler

CONT, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


class Controller:
    """Stands in for Tune's controller: what stop_trial does to a RUNNING trial, recorded."""

    def __init__(self, sched):
        self.sched, self.stopped = sched, []

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        self.sched.on_trial_complete(self, trial, trial.last_result)
        trial.status = Trial.TERMINATED


def _trials(sched, ctl, n):
    out = []
    for i in range(n):
        t = SimpleNamespace(trial_id=f"t{i}", status=Trial.RUNNING, last_result={})
        sched.on_trial_add(ctl, t)
        out.append(t)
    return out


def _report(sched, ctl, trial, it, value, metric="dev_mrr@10"):
    trial.last_result = {"training_iteration": it, metric: value}
    return sched.on_trial_result(ctl, trial, trial.last_result)


def test_rung_milestones():
    assert rung_milestones(1, 8, 3) == [1, 3]
    assert rung_milestones(1, 9, 3) == [1, 3]  # a rung at max_t is never judged: the trial ends there
    assert rung_milestones(2, 16, 2) == [2, 4, 8]
    assert rung_milestones(4, 4, 2) == []


def test_below_cutoff_is_asha_rule():
    assert not below_cutoff(0.1, [], 3)
    assert below_cutoff(0.5, [0.6], 3) and not below_cutoff(0.7, [0.6], 3)
    assert below_cutoff(0.6, [0.5, 0.7], 3)  # 2/3 quantile of [0.5, 0.7] is 0.633


def test_first_arrival_is_stopped_when_later_ones_beat_it():
    sched = RecheckASHA(max_t=8, grace_period=1, reduction_factor=3, metric="dev_mrr@10", mode="max")
    ctl = Controller(sched)
    t0, t1, t2 = _trials(sched, ctl, 3)
    assert _report(sched, ctl, t0, 1, 0.50) == CONT  # nothing to compare with: promoted, as in ASHA
    assert _report(sched, ctl, t1, 1, 0.70) == CONT
    assert ctl.stopped == ["t0"]  # re-judged against t1 at rung 1
    assert t0.status == Trial.TERMINATED and sched.num_restopped == 1
    assert _report(sched, ctl, t2, 1, 0.60) == STOP  # arrival rule unchanged
    assert ctl.stopped == ["t0"]
    assert _report(sched, ctl, t1, 8, 0.75) == STOP  # max_t: finished


def test_mode_min_and_finished_trials_are_left_alone():
    sched = RecheckASHA(max_t=8, grace_period=1, reduction_factor=2, metric="loss", mode="min")
    ctl = Controller(sched)
    t0, t1 = _trials(sched, ctl, 2)
    assert _report(sched, ctl, t0, 1, 2.0, "loss") == CONT
    t0.status = Trial.TERMINATED  # e.g. errored meanwhile: nothing to stop
    assert _report(sched, ctl, t1, 1, 1.0, "loss") == CONT  # lower is better
    assert ctl.stopped == []
    sched2 = RecheckASHA(max_t=8, grace_period=1, reduction_factor=2, metric="loss", mode="min")
    ctl2 = Controller(sched2)
    a, b = _trials(sched2, ctl2, 2)
    _report(sched2, ctl2, a, 1, 1.0, "loss")
    _report(sched2, ctl2, b, 1, 2.0, "loss")  # worse: stopped on arrival, a kept
    assert ctl2.stopped == []


def test_arrival_decisions_equal_rays_asha():
    """Without rechecks (trials never stopped by them), the per-arrival decisions are Ray's."""
    rng = random.Random(0)
    for _ in range(20):
        ours = RecheckASHA(max_t=9, grace_period=1, reduction_factor=3, metric="m", mode="max")
        ray_asha = AsyncHyperBandScheduler(max_t=9, grace_period=1, reduction_factor=3, metric="m", mode="max")
        ctl = SimpleNamespace(stop_trial=lambda t: None)
        trials = [SimpleNamespace(trial_id=f"t{i}", status=Trial.TERMINATED) for i in range(6)]
        for t in trials:
            ours.on_trial_add(ctl, t)
            ray_asha.on_trial_add(ctl, t)
        for it in (1, 2, 3, 4):
            for t in rng.sample(trials, len(trials)):
                r = {"training_iteration": it, "m": rng.random()}
                assert ours.on_trial_result(ctl, t, r) == ray_asha.on_trial_result(ctl, t, r)


def test_best_of_a_rung_is_never_rechecked_out():
    rng = random.Random(1)
    for _ in range(50):
        sched = RecheckASHA(max_t=8, grace_period=1, reduction_factor=rng.choice([2, 3, 4]), metric="m", mode="max")
        ctl = Controller(sched)
        trials = _trials(sched, ctl, 8)
        values = {t.trial_id: rng.random() for t in trials}
        for t in trials:
            if t.status == Trial.RUNNING:
                _report(sched, ctl, t, 1, values[t.trial_id], "m")
        best = max(values, key=values.get)
        assert best not in ctl.stopped and best not in sched.recheck(1)
        survivors = [t for t in trials if t.trial_id in sched._rungs[1] and t.trial_id not in sched.recheck(1)]
        assert len(survivors) >= 1


def test_missing_metric_continues_and_state_pickles_without_trials():
    sched = RecheckASHA(max_t=8, grace_period=1, reduction_factor=2, metric="m", mode="max")
    ctl = Controller(sched)
    (t0,) = _trials(sched, ctl, 1)
    assert sched.on_trial_result(ctl, t0, {"training_iteration": 1}) == CONT
    _report(sched, ctl, t0, 1, 0.3, "m")
    restored = pickle.loads(pickle.dumps(sched))
    assert restored._live == {} and restored._rungs[1] == {"t0": 0.3}


def test_bad_arguments_and_metric_required():
    with pytest.raises(ValueError, match="grace_period"):
        RecheckASHA(max_t=2, grace_period=3)
    with pytest.raises(ValueError, match="metric"):
        RecheckASHA(max_t=4).on_trial_add(None, SimpleNamespace(trial_id="x"))


def test_config_picks_the_scheduler():
    base = {"tune": {"scheduler": "asha", "reduction_factor": 3}, "trainer": {"max_steps": 64, "checkpoint_every": 8}}
    assert isinstance(_scheduler(Config.from_dict(base)), RecheckASHA)
    base["tune"]["asha_recheck"] = False
    assert type(_scheduler(Config.from_dict(base))) is AsyncHyperBandScheduler


def test_memory_estimate_and_warning(tiny_model_dir):
    from negatron.cluster.config import load_config
    from negatron.tune.search import GIB, memory_warning, trial_memory_bytes, weights_bytes

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "trainer.num_workers=2", "bank.size=0"])
    w = weights_bytes(cfg)
    assert w == sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors")) > 0
    assert trial_memory_bytes(cfg) == GIB + 2 * (GIB + 4 * w)
    moco = cfg.replace({"bank.size": 64, "bank.momentum": 0.99})
    assert trial_memory_bytes(moco) == GIB + 2 * (GIB + 5 * w)  # the key encoder is one more copy
    per = trial_memory_bytes(cfg)
    assert memory_warning(cfg, 3, 3 * per) is None and memory_warning(cfg, 3, 0) is None
    msg = memory_warning(cfg, 6, 2.5 * per)
    assert "6 trials at once" in msg and "tune.max_concurrent_trials=2" in msg
    # unknown model folder: only the fixed part is counted, no exception
    assert weights_bytes(cfg.replace({"model.path": str(tiny_model_dir / "missing")})) == 0

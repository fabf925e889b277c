"""ASHA that re-judges a rung when later trials reach it.

Ray's ``AsyncHyperBandScheduler`` decides once per trial and rung, at the moment the trial
arrives, against the trials recorded there *before* it. The first trial to reach a rung has
nothing to be compared with and is promoted unconditionally, and so are early arrivals while
the rung holds few values. On a small machine where only a few trials run at once, those first
arrivals often run to ``max_t`` whatever their score (measured: the weakest finisher of a
6-trial search ran all 64 steps).

``RecheckASHA`` keeps ASHA's rungs and its arrival rule (stop when the value is below the
``1 - 1/reduction_factor`` quantile of the values recorded at that rung before it) and adds one:
every time a rung gains a value, each *running* trial recorded at that rung is judged again by
the same rule against all the other values recorded there; one that no longer passes is stopped
right away (``tune_controller.stop_trial``, as Ray's synchronous HyperBand stops paused trials).
A trial therefore survives a rung only if it would also have survived arriving there last,
which is what synchronous successive halving gives, without pausing anyone.
"""

from __future__ import annotations

import math

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """ASHA's rungs below ``max_t``: grace, grace·rf, grace·rf², … (ascending)."""
    out, m = [], float(grace_period)
    while m < max_t:
        out.append(int(math.ceil(m)))
        m *= reduction_factor
    return out


def below_cutoff(value: float, others: list[float], reduction_factor: float) -> bool:
    """ASHA's rule: ``value`` is below the ``1 - 1/rf`` quantile of ``others`` (never, if none)."""
    if not others:
        return False
    return value < float(np.nanpercentile(others, (1 - 1 / reduction_factor) * 100))


class RecheckASHA(FIFOScheduler):
    """Asynchronous successive halving with rungs re-judged as they fill (see the module doc).

    ``time_attr`` counts reports; the metric and mode come from ``TuneConfig`` unless given.
    """

    def __init__(self, time_attr: str = "training_iteration", max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 2, metric: str | None = None, mode: str | None = None):
        if not (max_t > 0 and 0 < grace_period <= max_t and reduction_factor > 1):
            raise ValueError(f"RecheckASHA: need 0 < grace_period ({grace_period}) <= max_t ({max_t}) "
                             f"and reduction_factor ({reduction_factor}) > 1")
        super().__init__()
        self._time_attr = time_attr
        self._max_t = max_t
        self._rf = reduction_factor
        self._milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self._rungs: dict[int, dict[str, float]] = {m: {} for m in self._milestones}
        self._live: dict[str, Trial] = {}
        self._metric = metric
        self._mode = mode
        self.num_stopped = 0
        self.num_restopped = 0  # stopped by a later arrival at a rung they had passed

    # -- Tune's scheduler interface ---------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or self._mode not in ("max", "min"):
            raise ValueError("RecheckASHA needs a metric and a mode (max|min), from TuneConfig or its arguments")
        self._live[trial.trial_id] = trial

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        value = self._value(result)
        if value is None or self._time_attr not in result:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP
        action, milestone = self._arrive(trial.trial_id, result[self._time_attr], value)
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        if milestone is not None:
            for other in self.recheck(milestone, exclude=trial.trial_id):
                live = self._live.get(other)
                if live is not None and live.status == Trial.RUNNING:
                    print(f"[negatron] ASHA: stopping trial {other}: its {self._metric} at report {milestone} "
                          f"is no longer in the top 1/{self._rf:g} there", flush=True)
                    self.num_stopped += 1
                    self.num_restopped += 1
                    tune_controller.stop_trial(live)
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        value = self._value(result or {})
        if value is not None and self._time_attr in result and result[self._time_attr] < self._max_t:
            self._arrive(trial.trial_id, result[self._time_attr], value)
        self._live.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._live.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = " | ".join(f"rung {m}: {len(r)} recorded" for m, r in self._rungs.items())
        return f"RecheckASHA: {self.num_stopped} stopped ({self.num_restopped} on recheck); {rungs}"

    # -- pure bookkeeping (unit-tested without Ray) ----------------------------------------------

    def _value(self, result: dict) -> float | None:
        v = result.get(self._metric) if self._metric else None
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return float(v) if self._mode == "max" else -float(v)

    def _arrive(self, trial_id: str, t: float, value: float) -> tuple[str, int | None]:
        """Record ``value`` at the highest rung ``<= t`` this trial has not recorded; ASHA's decision."""
        for m in reversed(self._milestones):
            recorded = self._rungs[m]
            if t < m or trial_id in recorded:
                continue
            stop = below_cutoff(value, list(recorded.values()), self._rf)
            recorded[trial_id] = value
            return (TrialScheduler.STOP if stop else TrialScheduler.CONTINUE), m
        return TrialScheduler.CONTINUE, None

    def recheck(self, milestone: int, exclude: str | None = None) -> list[str]:
        """Trials recorded at ``milestone`` (other than ``exclude``) now below its cutoff."""
        recorded = self._rungs[milestone]
        out = []
        for tid, v in recorded.items():
            if tid == exclude:
                continue
            others = [w for o, w in recorded.items() if o != tid]
            if below_cutoff(v, others, self._rf):
                out.append(tid)
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_live"] = {}  # Trial objects belong to the controller; re-added on restore
        return state

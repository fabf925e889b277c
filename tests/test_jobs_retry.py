"""`negatron submit` retries the transient answers of a cluster that is still starting, for a
bounded time, then fails in one line (pure: a clock and a sleep of our own, no Ray)."""

import pytest

from negatron.cluster.jobs import JobsError, retry_transient


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_transient_answers_are_retried_with_backoff_then_succeed():
    clock, calls, logs = Clock(), [], []

    def submit():
        calls.append(clock.t)
        if len(calls) < 4:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later.")
        return "job-1"

    assert retry_transient(submit, "submitting", timeout_s=120, log=logs.append, sleep=clock.sleep, clock=clock) == "job-1"
    assert calls == [0.0, 1.0, 3.0, 7.0]  # waits 1, 2, 4 s
    assert len(logs) == 1 and "not ready yet" in logs[0]


def test_transient_answers_past_the_deadline_fail_in_one_line():
    clock = Clock()

    def submit():
        raise RuntimeError("Request failed with status code 500: No available agent to submit job\nmore detail")

    with pytest.raises(JobsError) as e:
        retry_transient(submit, "submitting to http://x", timeout_s=30, sleep=clock.sleep, clock=clock)
    assert "after" in str(e.value) and "\n" not in str(e.value) and clock.t <= 30


def test_other_errors_fail_at_once():
    clock = Clock()

    def submit():
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(JobsError, match="status code 400"):
        retry_transient(submit, "submitting", timeout_s=30, sleep=clock.sleep, clock=clock)
    assert clock.t == 0


def test_a_job_ships_no_credentials(monkeypatch):
    from negatron.cluster.jobs import job_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-TEST")
    env = job_env()
    assert not any(k.startswith(("AWS_", "GOOGLE_", "AZURE_", "RAY_AUTH")) for k in env)
    assert "hunter2" not in repr(env) and "AKIA-TEST" not in repr(env)

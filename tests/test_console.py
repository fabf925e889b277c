"""The quiet console: Negatron's lines on the terminal, Ray's chatter in the run folder's ray.log."""

import logging

from negatron.cluster import console


def _batch(*lines, is_err=False):
    return {"lines": list(lines), "pid": 123, "ip": "10.0.0.1", "actor_name": "RayTrainWorker", "is_err": is_err}


def test_forwarded_lines_are_filtered_to_the_terminal_and_all_logged(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NEGATRON_VERBOSE", raising=False)
    log = console.log_to(tmp_path / "run" / "ray.log")
    try:
        console._forward(_batch("Reporting training result 1: TrainingReport(...)",
                                "[negatron] step 4/4 epoch 0.50 loss 1.98",
                                "Loading faiss with AVX2 support."))
        console._forward(_batch("Traceback (most recent call last):", "ValueError: bad row 3", is_err=True))
    finally:
        console.log_to(None)
    out, err = capsys.readouterr()
    assert out == "[negatron] step 4/4 epoch 0.50 loss 1.98\n"
    assert err == "Traceback (most recent call last):\nValueError: bad row 3\n"
    text = log.read_text()
    assert "(RayTrainWorker pid=123, ip=10.0.0.1) Reporting training result 1" in text
    assert "Loading faiss" in text and "[negatron] step 4/4" in text and "ValueError: bad row 3" in text


def test_the_drivers_ray_logger_keeps_errors_on_the_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("NEGATRON_VERBOSE", raising=False)
    ray_logger = logging.getLogger("ray")
    stream = logging.StreamHandler()
    ray_logger.addHandler(stream)
    saved = ray_logger.level
    ray_logger.setLevel(logging.INFO)
    log = console.log_to(tmp_path / "ray.log")
    try:
        console.before_ray_init()
        assert stream.level == logging.ERROR
        logging.getLogger("ray.some_module").warning("Token authentication is enabled for this Ray cluster.")
    finally:
        console.log_to(None)
        ray_logger.removeHandler(stream)
        ray_logger.setLevel(saved)
    assert "WARNING ray.some_module: Token authentication is enabled" in log.read_text()


def test_verbose_changes_nothing(monkeypatch):
    monkeypatch.setenv("NEGATRON_VERBOSE", "1")
    stream = logging.StreamHandler()
    logging.getLogger("ray").addHandler(stream)
    try:
        console.before_ray_init()
        assert stream.level == logging.NOTSET and console.after_ray_init() is False
    finally:
        logging.getLogger("ray").removeHandler(stream)


def test_sigterm_after_our_ray_start_is_a_keyboard_interrupt():
    """``ensure_ray`` and ``init_local`` install it after ``ray.init`` (whose handler printed a native
    stack dump and exited 1): ``kill`` then unwinds like Ctrl-C, so ``finally`` blocks and
    ``ray.shutdown`` run. The handler itself, without starting Ray."""
    import os
    import signal
    import time

    import pytest

    from negatron.cluster.local import stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; the sleep is never reached in full
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_ray_that_does_not_start_is_named_with_the_raylets_own_reason(tmp_path):
    """Seen on this 2-core machine beside a bench: the raylet aborted because its dashboard agent took
    over 15 s to start, and ``ray.init`` said only "The current node timed out during startup"."""
    import os

    from negatron.cluster.errors import NegatronError
    from negatron.cluster.local import start_failure

    err = Exception("The current node timed out during startup. This could happen because some of the "
                    "raylet failed to startup or the GCS has become overloaded.")
    bare = start_failure(err, str(tmp_path))  # no session folder: Ray's own words, and the hint
    assert isinstance(bare, NegatronError) and "timed out during startup" in str(bare) and "busy" in str(bare)
    logs = tmp_path / "ray" / f"session_2026-12-03_17-45-49_188636_{os.getpid()}" / "logs"
    logs.mkdir(parents=True)
    port_file = "/tmp/ray/session_x/metrics_agent_port_1213650f"
    (logs / "raylet.out").write_text(
        "[2026-12-03 17:46:15,375 I 22953 22980] (raylet) agent_manager.cc:81: Monitor agent process\n"
        "[2026-12-03 17:46:30,668 C 22953 22953] (raylet) node_manager.cc:3576:  An unexpected system state "
        "has occurred. Check failed: statussetor3576.has_value() Timed out waiting for file " + port_file + "\n"
        "*** StackTrace Information ***\n")
    msg = str(start_failure(err, str(tmp_path)))
    assert msg.startswith(f"the embedded Ray did not start: Timed out waiting for file {port_file}")
    assert str(logs / "raylet.out") in msg and "\n" not in msg

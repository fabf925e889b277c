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
    stack dump and skipped the caller's cleanup): ``kill`` then unwinds like Ctrl-C, so ``finally``
    blocks and ``ray.shutdown`` run. The handler itself, without starting Ray."""
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

"""The `negatron serve` process on its own embedded Ray: ready, serving, drains on SIGTERM, exits 0.

No module-level Ray here: the child process runs the only Ray instance on the machine.
"""

import signal
import threading
import time

import httpx
import pytest

from tests.helpers import make_tiny_encoder
from tests.serve_proc import ServeProcess, free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("serveproc") / "enc"
    make_tiny_encoder(seed=0).save(root)
    return root


def test_negatron_serve_starts_drains_under_load_and_stops_on_sigterm(tmp_path, enc, monkeypatch):
    monkeypatch.delenv("NEGATRON_TEST_API_KEY", raising=False)
    port = free_port()
    with ServeProcess(["--model", str(enc), "--port", str(port), "serve.encoder.scale.num_cpus=0.25"], cwd=tmp_path) as sp:
        url = sp.wait_ready(300)
        assert url == f"http://127.0.0.1:{port}"
        r = httpx.post(url + "/v1/embeddings", json={"input": ["hello"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32

        # a load generator runs while SIGTERM arrives: every request that was answered before or
        # across the signal succeeds; afterwards the server refuses cleanly (no hang, no 5xx)
        events: list[tuple[float, float, object]] = []
        stop = threading.Event()

        def load():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t0 = time.time()
                    try:
                        resp = c.post(url + "/v1/embeddings", json={"input": ["def f(x): return x"] * 8})
                        outcome = resp.status_code
                    except httpx.TransportError as e:
                        outcome = type(e).__name__
                    events.append((t0, time.time(), outcome))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        t_sig = time.time()
        rc = sp.stop(signal.SIGTERM, timeout=120)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request hung past shutdown"
        assert rc == 0, sp.tail()
        assert "shutting down" in sp.tail()
        before = [e for e in events if e[0] < t_sig]
        assert before and all(e[2] == 200 for e in before), [e[2] for e in before if e[2] != 200][:5]
        after = {e[2] for e in events if e[0] >= t_sig}
        assert not {o for o in after if isinstance(o, int) and o >= 500}, after

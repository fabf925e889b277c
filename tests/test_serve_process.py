"""The `negatron serve` process on its own embedded Ray, with its defaults (direct ingress: the
ingress replica itself listens on the port): a replica killed under load is replaced, SIGTERM drains
in-flight requests and exits 0.

No module-level Ray here: the child process runs the only Ray instance on the machine.
"""

import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from bench.loadgen import Load, ServeProcess, free_port, replica_pids, summarize
from tests.helpers import make_tiny_encoder

pytestmark = pytest.mark.ray

BODY = {"input": ["def f(x): return x"] * 8}
KEY = "proc-test-key-5bd1c0"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serveproc")
    make_tiny_encoder(seed=0).save(root / "enc")
    env = {"NEGATRON_PROC_KEY": KEY}
    port = free_port()
    sp = ServeProcess(["--model", str(root / "enc"), "--port", str(port), "--api-key-env", "NEGATRON_PROC_KEY",
                       "serve.encoder.scale.num_cpus=0.25", "serve.request_timeout_s=60"], cwd=root, env=env)
    with sp:
        url = sp.wait_ready(300)
        assert url == f"http://127.0.0.1:{port}"
        # the default on the embedded Ray (serve.direct_ingress: auto): no proxy hop
        assert "the ingress replica answers directly" in "".join(sp.lines)
        yield sp


def test_binds_to_loopback_only(server):
    import psutil

    port = int(server.url.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


def test_serves_embeddings(server):
    assert httpx.post(server.url + "/v1/embeddings", json={"input": ["hello"]}, timeout=60).status_code == 401
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["hello"]}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32


def test_killed_encoder_replica_is_replaced_under_load(server):
    pids = replica_pids("negatron", "Encoder")
    assert len(pids) == 1, pids
    load = Load(server.url + "/v1/embeddings", BODY, threads=4, timeout_s=30, headers=AUTH).start()
    time.sleep(2.0)
    t_kill = time.time()
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.time() + 120
    while time.time() < deadline:  # until a new replica answers
        new = [p for p in replica_pids("negatron", "Encoder") if p != pids[0]]
        recent = [o for o in load.outcomes if o.start > t_kill + 0.5]
        if new and len(recent) > 20 and all(o.status == 200 for o in recent[-20:]):
            break
        time.sleep(0.5)
    time.sleep(1.0)
    assert load.stop(join_s=60), "a client hung in a request"
    s = summarize(load.outcomes, t_kill)
    assert s["ok"] > 40, s
    # every failure is a clean JSON 5xx (or the connection refused): nothing else, no hang
    assert s["errors_4xx"] == 0 and s["errors_5xx_other"] == 0, s
    assert s["max_latency_s"] < 30, s
    assert s["recovery_s"] is not None and s["recovery_s"] < 60, s
    after = [o for o in load.outcomes if o.start > t_kill + s["last_error_s"]]
    assert after and all(o.status == 200 for o in after), s
    assert [p for p in replica_pids("negatron", "Encoder") if p != pids[0]], "no new replica"


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    load = Load(server.url + "/v1/embeddings", BODY, threads=4, timeout_s=30, headers=AUTH).start()
    time.sleep(2.0)
    t_sig = time.time()
    rc = server.stop(signal.SIGTERM, timeout=120)
    assert load.stop(join_s=60), "a client hung in a request across shutdown"
    assert rc == 0, server.tail()
    assert "shutting down" in server.tail()
    before = [o for o in load.outcomes if o.start < t_sig]
    assert before and all(o.status == 200 for o in before), [(o.status, o.error) for o in before if o.status != 200][:5]
    after = [o for o in load.outcomes if o.start >= t_sig]
    assert not [o for o in after if o.status is not None and o.status >= 500 and not o.json_error]
    # the API key reached neither the server's output nor any of its Ray session's log files
    assert KEY not in "".join(server.lines)
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, leaked

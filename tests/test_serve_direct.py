"""`serve.direct_ingress`: the ingress replica itself serves serve.port, so requests skip Serve's
proxy (Ray Serve 2.60's direct ingress, on the embedded Ray `negatron serve` starts).

No module-level Ray here: the child process runs the only Ray instance on the machine.
"""

import os
import signal
import time

import httpx
import numpy as np
import psutil
import pytest

from bench.loadgen import ServeProcess, free_port, replica_pids
from negatron.cluster.config import ConfigError, load_config
from negatron.serve.app import direct_ingress_env, resolve_section, uses_direct_ingress
from tests.helpers import make_tiny_encoder


def _section(*overrides):
    return resolve_section(load_config(None, ["serve.encoder.path=default", *overrides]))


def test_auto_is_on_exactly_where_direct_ingress_can_run():
    assert _section().direct_ingress == "auto"
    assert uses_direct_ingress(_section(), embedded=True)
    assert not uses_direct_ingress(_section(), embedded=False)  # a running cluster: through the proxy
    assert not uses_direct_ingress(_section("serve.ingress.max_replicas=2"), embedded=True)
    assert not uses_direct_ingress(_section("serve.encoder.colocate=true", "serve.encoder.scale.max_replicas=2"),
                                   embedded=True)
    assert uses_direct_ingress(_section("serve.encoder.colocate=true", "serve.encoder.scale.max_replicas=1"),
                               embedded=True)
    assert not uses_direct_ingress(_section("serve.direct_ingress=false"), embedded=True)
    from negatron.serve.app import serve_config_yaml

    assert "negatron" in serve_config_yaml(_section())  # auto is simply off in a Serve config file


def test_direct_ingress_settings_and_refusals():
    env = direct_ingress_env(_section("serve.port=8123"), embedded=True)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates replica ports from [min, max): exactly serve.port
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8124")
    with pytest.raises(ConfigError, match="only on the embedded Ray"):
        direct_ingress_env(_section(), embedded=False)
    from negatron.serve.app import serve_config_yaml

    with pytest.raises(ConfigError, match="only on the embedded Ray"):  # `negatron serve build` cannot carry it
        serve_config_yaml(_section("serve.direct_ingress=true"))
    with pytest.raises(ConfigError, match=r"serve.ingress.max_replicas is 2"):
        direct_ingress_env(_section("serve.ingress.max_replicas=2"), embedded=True)
    with pytest.raises(ConfigError, match=r"serve.encoder.scale.max_replicas is 3"):
        direct_ingress_env(_section("serve.encoder.colocate=true", "serve.encoder.scale.max_replicas=3"), embedded=True)


@pytest.mark.ray
def test_the_ingress_replica_itself_serves_the_port(tmp_path):
    from negatron.trainers.encoder import Encoder

    make_tiny_encoder(seed=0).save(tmp_path / "enc")
    port = free_port()
    sp = ServeProcess(["--model", str(tmp_path / "enc"), "--port", str(port), "serve.direct_ingress=true",
                       "serve.encoder.scale.num_cpus=0.25"], cwd=tmp_path)
    with sp:
        assert sp.wait_ready(300) == f"http://127.0.0.1:{port}"
        texts = ["def f(x): return x", "open a file and read it"]
        r = httpx.post(sp.url + "/v1/embeddings", json={"input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, Encoder.from_pretrained(str(tmp_path / "enc")).encode(texts), atol=1e-5)
        assert httpx.get(sp.url + "/healthz", timeout=30).status_code == 200
        listeners = {c.pid for c in psutil.net_connections("tcp")
                     if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
        owners = [" ".join(psutil.Process(pid).cmdline()) for pid in listeners if pid]
        assert owners and all("Ingress" in o for o in owners), owners
        # a killed ingress replica is replaced on the same port (Serve's port quarantine is off)
        killed = list(listeners)
        os.kill(killed[0], signal.SIGKILL)
        deadline, back = time.time() + 120, False
        while time.time() < deadline and not back:
            time.sleep(0.5)
            try:
                back = httpx.post(sp.url + "/v1/embeddings", json={"input": texts}, timeout=10).status_code == 200
            except httpx.HTTPError:
                pass
        assert back, sp.tail()
        assert killed[0] not in replica_pids("negatron", "Ingress")
        t0 = time.time()
        assert sp.stop() == 0, sp.tail()
        assert time.time() - t0 < 60

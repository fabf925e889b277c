"""What happens to a huge request body on the installed Ray Serve: how much the HTTP proxy and the
ingress replica hold, and what the client gets back.

Starts `negatron serve` in-process on an embedded Ray (the packaged model, the default limits:
8 MB bodies), then streams a 200 MB body to /v1/embeddings over a raw socket, as fast as loopback
allows, once chunked (no Content-Length) and once with a declared Content-Length, while sampling
the RSS of Serve's proxy actor and of the Ingress replica every 20 ms. Prints JSON.

    .venv/bin/python bench/proxy_body.py [--mb 200] [--direct-ingress]

``--direct-ingress``: the way `negatron serve` runs on its embedded Ray by default
(``serve.direct_ingress: auto``): the ingress replica itself listens on the port, the proxy elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs():
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ProxyActor" in cmd:
            out["proxy"] = p
        elif "ServeReplica:negatron:Ingress" in cmd:
            out["ingress"] = p
    return out


def upload(port: int, mb: int, chunked: bool, procs: dict) -> dict:
    peak = {k: p.memory_info().rss for k, p in procs.items()}
    base = dict(peak)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, p in procs.items():
                try:
                    peak[k] = max(peak[k], p.memory_info().rss)
                except Exception:  # noqa: BLE001 - the process may be gone
                    pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    s = socket.create_connection(("127.0.0.1", port))
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {mb << 20}\r\n") + "\r\n")
    s.sendall(head.encode())
    chunk = b'{"input": "' + b"x" * ((1 << 20) - 11)
    sent, t0, first_response_s, error = 0, time.perf_counter(), None, None
    s.settimeout(0.0)
    response = b""
    try:
        for _ in range(mb):
            payload = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
            view = memoryview(payload)
            while view:
                try:
                    n = s.send(view)
                    view = view[n:]
                    sent += n
                except BlockingIOError:
                    time.sleep(0.001)
                try:
                    got = s.recv(65536)
                    if got:
                        response += got
                        first_response_s = first_response_s or time.perf_counter() - t0
                except BlockingIOError:
                    pass
                if response and b"\r\n\r\n" in response:
                    raise StopIteration
        if chunked:
            s.sendall(b"0\r\n\r\n")
    except StopIteration:
        pass
    except OSError as e:  # the server closed the connection
        error = f"{type(e).__name__}: {e}"
    s.settimeout(30)
    try:
        while b"\r\n\r\n" not in response:
            got = s.recv(65536)
            if not got:
                break
            response += got
            first_response_s = first_response_s or time.perf_counter() - t0
    except OSError as e:
        error = error or f"{type(e).__name__}: {e}"
    s.close()
    time.sleep(0.5)
    stop.set()
    t.join()
    status = response.split(b"\r\n", 1)[0].decode(errors="replace") if response else None
    body = response.split(b"\r\n\r\n", 1)[1][:200].decode(errors="replace") if b"\r\n\r\n" in response else ""
    return {"mode": "chunked" if chunked else "content-length", "body_mb": mb,
            "client_sent_mb": round(sent / (1 << 20), 1), "status": status, "body_start": body,
            "response_after_s": round(first_response_s, 3) if first_response_s else None, "client_error": error,
            "rss_growth_mb": {k: round((peak[k] - base[k]) / (1 << 20), 1) for k in peak}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--direct-ingress", action="store_true", help="as `negatron serve` runs by default")
    args = ap.parse_args()
    import ray
    from ray import serve

    from negatron.cluster.config import load_config
    from negatron.serve.app import prepare_direct_ingress, resolve_section, start

    from negatron.cluster.local import init_local  # workers know their own cluster's address
    port = _free_port()
    section = resolve_section(load_config(None, ["serve.encoder.path=default", f"serve.port={port}",
                                                 f"serve.direct_ingress={str(args.direct_ingress).lower()}"]))
    proxy_port = prepare_direct_ingress(section, embedded=True)  # before Ray starts, as `negatron serve` does
    init_local(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = start(section, blocking_wait_s=300, proxy_port=proxy_port)
        procs = _procs()
        results = [upload(port, args.mb, True, procs), upload(port, args.mb, False, procs)]
        import ray as _r

        print(json.dumps({"ray": _r.__version__, "url": url, "direct_ingress": args.direct_ingress,
                          "max_body_bytes": section.limits.max_body_bytes,
                          "results": results}, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

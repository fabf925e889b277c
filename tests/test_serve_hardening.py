"""Serving holes closed in hardening round two, tested without Ray: the image bomb, blocking work
on the ingress event loop, readiness probes."""

import asyncio
import base64
import io
import threading

import numpy as np
import pytest

from negatron.serve.api import ApiError, decode_images_request
from negatron.serve.deployments import Readiness

LIMITS = {"max_texts": 256, "max_image_bytes": 2_000_000, "max_image_pixels": 4096 * 4096,
          "max_request_pixels": 64 * 1024 * 1024}


def _png(w: int, h: int, mode: str = "1", fill: int = 0) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), fill).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_image_bomb_request_is_refused_from_headers_before_decoding():
    bomb = _png(4096, 4096)  # one bit per pixel: a few KB that decode to 16 MB each
    assert len(bomb) < 10_000
    with pytest.raises(ApiError) as e:
        decode_images_request([bomb] * 256, False, LIMITS, size=16, channels=1)
    assert e.value.status == 413 and e.value.code == "request_pixels_too_large"
    assert "max_request_pixels" in e.value.message


def test_decoded_images_are_shrunk_to_the_model_input_and_embed_the_same():
    import torch

    from negatron.trainers.images import ImageEncoder, ImageEncoderSettings

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    item = base64.b64encode(buf.getvalue()).decode()
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderSettings(channels=1, image_size=16)).eval()
    out = decode_images_request([item, item], False, LIMITS, size=16, channels=1)
    assert [a.shape for a in out] == [(1, 16, 16), (1, 16, 16)]
    direct = enc.encode([arr])
    assert np.allclose(enc.encode(out)[0], direct[0], atol=1e-6)


def test_only_png_and_jpeg_are_opened():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="BMP")
    with pytest.raises(ApiError) as e:
        decode_images_request([base64.b64encode(buf.getvalue()).decode()], True, LIMITS)
    assert e.value.status == 400 and e.value.param == "input"


def test_text_limit_check_runs_off_the_event_loop(tiny_model_dir):
    """The ingress's tokenizing limit check runs in a worker thread, not on the event loop."""
    from transformers import AutoTokenizer

    from negatron.serve.api import Ingress

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    threads = []

    class Recording:
        def __call__(self, *a, **k):
            threads.append(threading.get_ident())
            return tok(*a, **k)

    cls = Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.limits = {"max_texts": 256, "max_text_chars": 20000, "overlong": "truncate"}
    ingress.tokenizers, ingress.token_limits = {"m": Recording()}, {"m": 64}
    ingress.models, ingress.default_model, ingress.image_models, ingress.dims = {"m": "x"}, "m", set(), {}
    ingress.local, ingress._coalesce = {}, None

    async def fake_embed(name, texts, fmt, tokens):
        return tokens

    ingress._embed = fake_embed
    from negatron.serve.api import EmbeddingsRequest

    async def main():
        loop_thread = threading.get_ident()
        tokens = await cls.embeddings(ingress, EmbeddingsRequest(input=["def f(x): return x"] * 3))
        return loop_thread, tokens

    loop_thread, tokens = asyncio.run(main())
    assert tokens > 0 and threads and all(t != loop_thread for t in threads)


def test_readiness_waits_for_every_probe_and_then_stays_open():
    state = {"retriever": False}

    async def encoder():
        return True

    async def retriever():
        if not state["retriever"]:
            await asyncio.sleep(10)  # no replica yet: the call would queue
        return True

    async def main():
        r = Readiness({"encoder": encoder, "retriever": retriever}, timeout_s=0.05, ttl_s=0.0)
        first = await r.gate()
        status = dict(r.status)
        state["retriever"] = True
        second = await r.gate()
        state["retriever"] = False
        third = await r.gate()  # opened once: later trouble is the routes' own 503s
        return first, status, second, third

    first, status, second, third = asyncio.run(main())
    assert first == 5 and status == {"encoder": "ready", "retriever": "starting"}
    assert second is None and third is None


def test_a_probe_cancelled_at_its_timeout_is_starting_not_an_error():
    """A Serve call cancelled by the probe's timeout can end with Ray's TaskCancelledError, which
    asyncio.wait_for then raises in place of TimeoutError (seen in CI): still "starting"."""
    from ray.exceptions import TaskCancelledError

    async def queued():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TaskCancelledError() from None
        return True

    async def main():
        r = Readiness({"retriever": queued}, timeout_s=0.05, ttl_s=0.0)
        return await r.gate(), await r.check()

    wait, status = asyncio.run(main())
    assert wait == 5 and status == {"retriever": "starting"}


def test_a_failing_probe_is_reported_not_raised():
    async def broken():
        raise RuntimeError("replica died")

    async def main():
        r = Readiness({"reranker": broken}, timeout_s=0.1, ttl_s=0.0)
        return await r.gate(), await r.check()

    wait, status = asyncio.run(main())
    assert wait == 5 and status["reranker"].startswith("error")


def test_readiness_remembers_an_app_that_was_ready_before():
    calls = []

    async def starting():
        await asyncio.sleep(10)

    async def ready():
        return True

    async def main():
        upgraded = Readiness({"retriever": starting}, timeout_s=0.05, opened=True)  # a replica of a running app
        fresh = Readiness({"retriever": ready}, timeout_s=0.05, ttl_s=0.0, on_open=lambda: calls.append(1))
        return await upgraded.gate(), await fresh.gate(), await fresh.gate()

    assert asyncio.run(main()) == (None, None, None)
    assert calls == [1]  # recorded once, when it first opened

"""Image requests: base64 PNG/JPEG → model-ready arrays, with every limit checked from the image
headers before any pixel is decoded (blocking work: the Ingress calls it off the event loop)."""

import base64

import numpy as np

from .schemas import ApiError

IMAGE_FORMATS = ("PNG", "JPEG")


def b64_bytes(item: str, param: str, max_bytes: int) -> bytes:
    import binascii

    if item.startswith("data:"):
        item = item.split(",", 1)[1] if "," in item else ""
    if len(item) > (max_bytes * 4) // 3 + 4:
        raise ApiError(413, f"'{param}' is over {max_bytes} bytes", param, "image_too_large")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{param}' is not valid base64", param, "invalid_image") from None


def open_image(raw: bytes, param: str):
    """PIL image (header read, pixels not decoded yet); PNG and JPEG only."""
    import io

    from PIL import Image

    try:
        return Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except Exception:  # PIL raises several types for bad bytes or other formats
        raise ApiError(400, f"'{param}' is not a readable PNG or JPEG image", param, "invalid_image") from None


def _pixels(im, param: str) -> np.ndarray:
    try:
        im = im.convert("L") if im.mode in ("L", "1", "P", "I", "I;16", "LA") else im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    except Exception:  # truncated or corrupt pixel data
        raise ApiError(400, f"'{param}' is not a readable PNG or JPEG image", param, "invalid_image") from None


def decode_images_request(items: list[str], single: bool, limits: dict, size: int = 0,
                          channels: int = 0) -> list[np.ndarray]:
    """A request's base64 PNG/JPEG images → model-ready arrays, with every limit checked first.

    Each image's bytes and pixels are checked, then the pixels of the whole request
    (``limits['max_request_pixels']``) from the image headers, before any pixel is decoded. With
    ``size`` (the image model's input side) each image is shrunk to the model's input as soon as it
    is decoded (exactly the model's own resize: embeddings are unchanged), so at most one full-size
    image is held at a time and the Encoder receives size×size arrays. Blocking: call it off the
    event loop.

    Raises:
        ApiError: 400 for a bad image, 413 naming the limit that was passed.
    """
    if not items:
        raise ApiError(400, "'input' is empty: give at least one image", "input", "empty_input")
    if len(items) > limits["max_texts"]:
        raise ApiError(413, f"'input' has {len(items)} images; the limit is {limits['max_texts']} per request",
                       "input", "too_many_inputs")
    budget = int(limits.get("max_request_pixels") or 0)
    opened, total = [], 0
    try:
        for i, item in enumerate(items):
            at = "input" if single else f"input[{i}]"
            im = open_image(b64_bytes(item, at, limits["max_image_bytes"]), at)
            opened.append((at, im))
            if im.width * im.height > limits["max_image_pixels"]:
                raise ApiError(413, f"'{at}' is {im.width}x{im.height} pixels; the limit is "
                                    f"{limits['max_image_pixels']}", at, "image_too_large")
            total += im.width * im.height
            if budget and total > budget:
                raise ApiError(413, f"the images of this request hold over {budget} pixels in all "
                                    f"(serve.limits.max_request_pixels); send fewer or smaller images",
                               "input", "request_pixels_too_large")
        return [_shrink(_pixels(im, at), size, channels) if size else _pixels(im, at) for at, im in opened]
    finally:
        for _, im in opened:
            im.close()


def _shrink(arr: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 H×W[×C] → float32 C×size×size, through the image model's own ``prepare``."""
    import torch

    from negatron.trainers.image_encoder import prepare, to_tensor

    with torch.no_grad():
        return prepare(to_tensor([arr]), size, channels)[0].numpy()

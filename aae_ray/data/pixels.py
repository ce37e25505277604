"""Image bytes to pixels and to model input: the preprocessing of training, `aae-ray score`, the endpoint and the
edge scorer. numpy and Pillow only (aae_ray.edge imports it on a box without pyarrow or torch)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or just too big)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Bytes of any format PIL reads -> uint8 (H, W) gray or (H, W, 3) RGB. Raises ValueError if undecodable,
    ImageTooLarge if the header declares more than `max_pixels` pixels (checked before any pixel is decoded:
    a few KB of PNG can expand to gigabytes, and PIL's own limit only warns below 2 x 89 M pixels)."""
    try:
        img = Image.open(io.BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            msg = f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit of {max_pixels:,}"
            raise ImageTooLarge(msg)
        img.load()
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"cannot decode image: {exc}") from exc
    return to_uint8(img)


def to_uint8(img: Image.Image) -> np.ndarray:
    """Normalise PIL modes (1, L, I;16, P, RGBA, CMYK, ...) to uint8 gray or RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return scaled.round().astype(np.uint8)
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA") else "RGB")
    return np.asarray(img, dtype=np.uint8)


def to_model_input(images: list[bytes], size: int, max_pixels: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> float32 (N, 1, size, size) in [0, 1]: gray, resized with antialiasing. One image is
    decoded at a time; `max_pixels` bounds each (decode_image)."""
    out = np.empty((len(images), 1, size, size), dtype=np.float32)
    for i, data in enumerate(images):
        pixels = decode_image(data, max_pixels)
        img = Image.fromarray(pixels).convert("L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        out[i, 0] = np.asarray(img, dtype=np.float32) / 255.0
    return out

"""What both pages share: their script arguments and how they draw an image. Pure numpy, no Streamlit (so tests
need no browser)."""

from __future__ import annotations

import numpy as np


def script_arg(argv: list[str], name: str, default: str | None = None) -> str | None:
    """`--name VALUE` or `--name=VALUE` from a page script's arguments (after `streamlit run PAGE --`)."""
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def upscale(img: np.ndarray, min_px: int) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so small images (32x32) stay crisp in the browser."""
    factor = max(1, -(-min_px // max(img.shape[0], img.shape[1])))
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def heat_overlay(gray: np.ndarray, amap: np.ndarray, alpha: float = 0.8) -> np.ndarray:
    """Gray image in [0, 1] and a per-pixel error map -> uint8 RGB, the normalised error blended in as red."""
    a = np.asarray(amap, dtype=np.float64)
    a = a - a.min()
    a = alpha * (a / a.max() if a.max() > 0 else a)
    g = np.clip(np.asarray(gray, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([g * (1 - a) + a, g * (1 - a), g * (1 - a)], axis=-1)
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)

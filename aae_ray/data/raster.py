"""Vectorised drawing primitives on coordinate grids: soft-edged shapes, texture, blur.

numpy, PIL for resizing and scipy.ndimage for the blur; no BLAS: small matrix products were slower here.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage


@lru_cache(maxsize=8)
def axis(size: int) -> np.ndarray:
    """Pixel centres of one image side, mapped to [-1, 1]."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float, edge: float) -> np.ndarray:
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    return ramp(r - radius, edge, rising=False)


def capsule_mask(
    x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float, half_w: float
) -> np.ndarray:
    """1 within `half_w` of the segment (x0, y0)-(x1, y1), soft edge."""
    return ramp(segment_distance(x, y, x0, y0, x1, y1) - half_w, 0.015, rising=False)


def capsule(
    x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float, half_w: float, peak: float
) -> np.ndarray:
    """A solder streak: thickest along its axis, like a dome swept along the segment."""
    d = segment_distance(x, y, x0, y0, x1, y1) / half_w
    return peak * np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))


def segment_distance(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2)


def box(dx: np.ndarray, dy: np.ndarray, hw: float, hh: float, edge: float) -> np.ndarray:
    return ramp(np.abs(dx) - hw, edge, rising=False) * ramp(np.abs(dy) - hh, edge, rising=False)


def ramp(d: np.ndarray, edge: float, rising: bool) -> np.ndarray:
    """A linear step of width `edge` at d = 0: cheaper than a sigmoid and the blur rounds it anyway."""
    step = np.clip(0.5 + d / edge, 0.0, 1.0)
    return step if rising else 1.0 - step


def texture(seed: int, size: int) -> np.ndarray:
    """Multiplicative board texture: blotchy laminate plus a faint glass-fibre weave, around 1.0."""
    rng = np.random.default_rng(seed)
    blotch = upsample(rng.standard_normal((6, 6), dtype=np.float32), size)
    grain = upsample(rng.standard_normal((20, 20), dtype=np.float32), size)
    u = axis(size)
    freq = math.pi / rng.uniform(0.08, 0.12)
    phase_x, phase_y = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
    weave = np.sin(u[None, :] * freq + phase_x) * np.sin(u[:, None] * freq + phase_y)
    return 1.0 + 0.025 * blotch + 0.012 * grain + 0.008 * weave


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small float grid into a smooth (size, size) field."""
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with edge padding, so the borders do not darken; the kernel reaches 2.5 sigma."""
    return ndimage.gaussian_filter(image, sigma, mode="nearest", radius=max(1, math.ceil(2.5 * sigma)))

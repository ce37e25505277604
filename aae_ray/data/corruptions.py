"""Synthetic local defects on normal images: the tuning objective when `val` holds no confirmed defects.

Hyper-parameter search needs a score to rank trials. With labeled defects in `val` that is their AUROC against
the val normals; without any, the fallback is AUROC of held-out normals against corrupted copies of those same
normals. The corruptions are a proxy, not real defects: they reward a model for noticing a local, visible change
on the part, which is what most real defects are, but a model tuned on them can still miss defect kinds they do
not resemble (a part that is missing altogether, a subtle change of shape). Use the score to rank trials, not as
an estimate of how well real defects will be found.

Nothing here assumes a data set: no polarity (dark parts on a light board or light garments on black), no size
beyond S >= 4. Each kind changes one region of roughly 15-30% of the image side, placed on the part if there is one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MIN_CHANGE = 0.005  # mean absolute change per image below which a corruption would not count as visible
_MIN_SIDE = 4


def _side(S: int, rng: np.random.Generator) -> float:
    # At least 3 px so that small images still get a region with a core, not just an edge.
    return min(max(3.0, rng.uniform(0.15, 0.3) * S), S - 1.0)


def _centre(img: np.ndarray, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A pixel on the part, kept `margin` from the border. The part is what differs from the median, which is the
    background on most images whatever its polarity; a flat image has no part, so anywhere will do."""
    dev = np.abs(img - np.median(img))
    ys, xs = np.nonzero(dev > max(0.5 * float(img.std()), 1e-3))
    if len(ys) == 0:
        ys, xs = np.indices(img.shape).reshape(2, -1)
    i = rng.integers(len(ys))
    lo, hi = margin, img.shape[0] - 1 - margin
    return float(np.clip(ys[i], lo, hi)), float(np.clip(xs[i], lo, hi))


def _box(img: np.ndarray, rng: np.random.Generator) -> tuple[slice, slice]:
    S = img.shape[0]
    h, w = int(round(_side(S, rng))), int(round(_side(S, rng)))
    cy, cx = _centre(img, rng, max(h, w) / 2)
    y0, x0 = int(np.clip(round(cy - h / 2), 0, S - h)), int(np.clip(round(cx - w / 2), 0, S - w))
    return slice(y0, y0 + h), slice(x0, x0 + w)


def _ellipse(S: int, cy: float, cx: float, a: float, b: float, angle: float) -> np.ndarray:
    """Weight 1 inside, 0 outside, with a one-pixel ramp so the edge is not aliased."""
    dy, dx = np.indices((S, S), dtype=np.float32) - np.array([cy, cx], dtype=np.float32)[:, None, None]
    u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return np.clip((1 - rho) * min(a, b) + 0.5, 0, 1)


def _far_level(img: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> float:
    # Dark where the region is bright and bright where it is dark: a void in solder, an inclusion in fabric.
    local = float((img * w).sum() / max(float(w.sum()), 1e-6))
    return rng.uniform(0.0, 0.15) if local > 0.5 else rng.uniform(0.85, 1.0)


def _blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    S = img.shape[0]
    a = _side(S, rng) / 2
    cy, cx = _centre(img, rng, a)
    w = _ellipse(S, cy, cx, a, a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)) * rng.uniform(0.8, 1.0)
    return img + w * (_far_level(img, w, rng) - img)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    S = img.shape[0]
    half_len = rng.uniform(0.2, 0.35) * S
    half_width = rng.uniform(0.5, 1.5) * max(1.0, S / 40)  # 1-3 px wide at 32, 3-10 px at 128
    cy, cx = _centre(img, rng, half_len)
    angle = rng.uniform(0, np.pi)
    dy, dx = np.indices((S, S), dtype=np.float32) - np.array([cy, cx], dtype=np.float32)[:, None, None]
    t = np.clip(np.cos(angle) * dx + np.sin(angle) * dy, -half_len, half_len)
    dist = np.hypot(dx - t * np.cos(angle), dy - t * np.sin(angle))
    w = np.clip(half_width + 0.5 - dist, 0, 1) * rng.uniform(0.8, 1.0)
    return img + w * (_far_level(img, w, rng) - img)


def _cutout(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out, box = img.copy(), _box(img, rng)
    # The image minimum stands in for the background showing through a missing piece. Where the region is near
    # it already, or one time in three, a random level at least 0.3 away from the region's mean is used instead.
    mean, level = float(img[box].mean()), float(img.min())
    if mean - level < 0.25 or rng.random() < 1 / 3:
        level = (mean + rng.uniform(0.3, 0.7)) % 1.0
    out[box] = level
    return out


def _noise_patch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out, box = img.copy(), _box(img, rng)
    out[box] += rng.normal(0, rng.uniform(0.3, 0.5), out[box].shape).astype(np.float32)
    return out


def _displace(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    S = img.shape[0]
    out, (ys, xs) = img.copy(), _box(img, rng)
    h, w = ys.stop - ys.start, xs.stop - xs.start
    # A piece of the image pasted flipped over the region. A nearby piece of a smooth image looks much like what
    # it covers, so the most different of a few pieces taken from anywhere is used.
    tops = rng.integers(0, S - h + 1, 4), rng.integers(0, S - w + 1, 4)
    axes = [((0,), (1,), (0, 1))[i] for i in rng.integers(3, size=4)]
    pieces = [np.flip(img[y : y + h, x : x + w], ax) for y, x, ax in zip(*tops, axes, strict=True)]
    out[ys, xs] = max(pieces, key=lambda p: float(np.abs(p - img[ys, xs]).sum()))
    return out


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # About mid-gray rather than the patch's own range, so that a flat patch changes too.
    out, box = img.copy(), _box(img, rng)
    out[box] = 1 - img[box]
    return out


_DRAW: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "blob": _blob,
    "scratch": _scratch,
    "cutout": _cutout,
    "noise_patch": _noise_patch,
    "displace": _displace,
    "invert": _invert,
}
KINDS: tuple[str, ...] = tuple(_DRAW)


def _fallback(img: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A full-strength blob whose pixels move to the far end of [0, 1] from `img`: at least 0.5 each, so the
    change is visible on any image, flat ones included."""
    S = img.shape[0]
    a = min(0.15 * S, (S - 1) / 2)
    cy, cx = _centre(img, rng, a)
    w = _ellipse(S, cy, cx, a, a, 0.0)
    return out + w * (np.where(img > 0.5, 0.0, 1.0) - out)


def _check_values(X: np.ndarray) -> None:
    if not np.isfinite(X).all():
        raise ValueError("images contain NaN or infinite values")
    if X.size and (X.min() < 0 or X.max() > 1):
        raise ValueError(f"image values must lie in [0, 1], got [{X.min():.3g}, {X.max():.3g}]")


def _corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    out = np.clip(_DRAW[kind](img, rng), 0, 1)
    if np.abs(out - img).mean() <= MIN_CHANGE:
        out = np.clip(_fallback(img, out, rng), 0, 1)
    return out.astype(np.float32)


def corrupt_one(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One image (S, S) in [0, 1] with one defect of `kind` (one of KINDS); a new float32 array."""
    if kind not in _DRAW:
        raise ValueError(f"unknown corruption kind {kind!r}; expected one of {', '.join(KINDS)}")
    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] < _MIN_SIDE:
        raise ValueError(f"expected a square image (S, S) with S >= {_MIN_SIDE}, got shape {img.shape}")
    _check_values(img)
    return _corrupt(img.astype(np.float32), kind, rng)


def corrupt(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """X: float32 (N, 1, S, S) in [0, 1]. A new float32 array of the same shape, values in [0, 1], each image
    changed by one local defect of a kind drawn uniformly from KINDS."""
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1] != 1 or X.shape[2] != X.shape[3] or X.shape[2] < _MIN_SIDE:
        raise ValueError(f"expected images of shape (N, 1, S, S) with S >= {_MIN_SIDE}, got {X.shape}")
    _check_values(X)
    out = np.empty(X.shape, dtype=np.float32)
    for i, k in enumerate(rng.integers(len(KINDS), size=len(X))):
        out[i, 0] = _corrupt(X[i, 0].astype(np.float32), KINDS[k], rng)
    return out

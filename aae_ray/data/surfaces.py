"""Real texture surfaces with synthetic local defects: a small benchmark for defect localization.

The normals are real: crops of three gray 512x512 photographs (brick wall, grass, gravel) that ship inside the
scikit-image package, read from its installed folder with PIL, so nothing is downloaded. The defects are
synthetic: scratches, spots, cracks and smudges drawn onto real crops, each with a pixel mask of where it changed
the image. A detector that finds these has learned the texture, not a rendering artefact of the normals, but the
defects themselves are not photographs of real damage.

To keep train and test honest, train crops are cut from the top 70% of the photograph's rows and test crops from
the bottom 30%, so no test pixel was ever seen in training. A texture is roughly stationary, so the two parts
look alike (their means and standard deviations agree to within 0.01 on all three photographs).

Crops are `crop` x `crop` windows downsized to `size` exactly as the image table's images are
(aae_ray.data.images.to_model_input, fed the crop's PNG bytes), so a model sees the same kind of pixels here as
in the workspace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from aae_ray.data.images import encode_png, to_model_input

SURFACES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack", "smudge")
TRAIN_FRACTION = 0.7  # of the photograph's rows, from the top; the rest is for test crops
MASK_THRESHOLD = 0.02  # |change| above which a pixel is part of the defect: about 5 gray levels
STRENGTH = (2.5, 4.0)  # scratch, spot and crack amplitudes, in standard deviations of the crop
SMUDGE_TINT = (1.0, 2.0)  # smudge's brightness shift, in standard deviations of the crop
_MIN_MASK_PX = 3  # at 32 px; a defect smaller than this is redrawn
_MAX_TRIES = 50


@dataclass(frozen=True)
class SurfaceSet:
    """One surface's benchmark. Images are float32 (N, 1, size, size) in [0, 1]; masks float32 (N, size, size)
    in {0, 1}, all zero for normals. Origins are the (row, column) of each crop's top-left corner in the
    photograph, so a crop can be cut again."""

    surface: str
    X_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray  # int8: 1 defect, 0 normal
    mask_test: np.ndarray
    kind_test: np.ndarray  # str: "normal" or one of DEFECT_KINDS
    origin_train: np.ndarray  # int64 (N, 2)
    origin_test: np.ndarray
    crop: int


def photo_path(surface: str) -> Path:
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; expected one of {', '.join(SURFACES)}")
    # Imported here: skimage is only needed for its data folder. skimage.data.brick() and friends may go
    # through pooch's cache; the file in the installed package is always there.
    import skimage.data

    return Path(os.path.dirname(skimage.data.__file__)) / f"{surface}.png"


@lru_cache(maxsize=len(SURFACES))
def load_photo(surface: str) -> np.ndarray:
    """The photograph as uint8 (H, W) gray, read-only (it is cached)."""
    with Image.open(photo_path(surface)) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8).copy()
    pixels.setflags(write=False)
    return pixels


def row_ranges(height: int, crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive ranges of crop top rows for train and test: train crops end above the split row, test crops
    start at or below it, so the two never share a photograph row."""
    split = int(TRAIN_FRACTION * height)
    if split < crop or height - split < crop:
        raise ValueError(f"a {crop}-px crop does not fit both parts of a {height}-row photograph split at {split}")
    return (0, split - crop), (split, height - crop)


def crop_origins(rng: np.random.Generator, n: int, rows: tuple[int, int], width: int, crop: int) -> np.ndarray:
    """n random (row, column) top-left corners, rows within the inclusive range `rows`."""
    r = rng.integers(rows[0], rows[1] + 1, size=n)
    c = rng.integers(0, width - crop + 1, size=n)
    return np.stack([r, c], axis=1).astype(np.int64)


def cut_crops(photo: np.ndarray, origins: np.ndarray, crop: int, size: int) -> np.ndarray:
    """float32 (N, 1, size, size) in [0, 1], resized by the same code as the image table's images."""
    pngs = [encode_png(np.ascontiguousarray(photo[r : r + crop, c : c + crop])) for r, c in origins]
    return to_model_input(pngs, size)


# --- defects ---------------------------------------------------------------------------------------------------
# Sizes are given at 32 px and scale with the image. Additive defects move pixels by a few standard deviations
# of the crop itself: on a low-contrast texture a fixed change would be glaring, on a busy one invisible.


def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.indices((S, S), dtype=np.float64)
    return ys, xs


def _segment_distance(S: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the segment p-q (points as (row, column))."""
    ys, xs = _grid(S)
    d = q - p
    t = np.clip(((ys - p[0]) * d[0] + (xs - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    return np.hypot(ys - (p[0] + t * d[0]), xs - (p[1] + t * d[1]))


def _stroke(dist: np.ndarray, half_width: float) -> np.ndarray:
    # Weight 1 on the line, a one-pixel ramp at its edge so that a thin line is not aliased into a staircase.
    return np.clip(half_width + 0.5 - dist, 0, 1)


def _centre(S: int, rng: np.random.Generator, margin: float) -> np.ndarray:
    margin = min(margin, (S - 1) / 2)
    return rng.uniform(margin, S - 1 - margin, size=2)


def _amplitude(img: np.ndarray, rng: np.random.Generator) -> float:
    sigma = max(float(img.std()), 0.02)  # a flat crop still gets a visible change
    return rng.uniform(*STRENGTH) * sigma


def _scratch(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A straight thin line, bright (polished metal showing) or dark (a groove in shadow)."""
    S = img.shape[0]
    length, width = rng.uniform(8, 16) * s, rng.uniform(1, 2) * s
    mid, angle = _centre(S, rng, length / 2), rng.uniform(0, np.pi)
    half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    w = _stroke(_segment_distance(S, mid - half, mid + half), width / 2)
    return img + rng.choice([-1.0, 1.0]) * _amplitude(img, rng) * w


def _spot(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A round blob, dark (a stain, a pit) or bright (a deposit)."""
    S = img.shape[0]
    radius = rng.uniform(2, 4) * s
    cy, cx = _centre(S, rng, radius)
    ys, xs = _grid(S)
    w = np.clip(radius + 0.5 - np.hypot(ys - cy, xs - cx), 0, 1)
    return img + rng.choice([-1.0, 1.0]) * _amplitude(img, rng) * w


def _crack(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A thin dark random walk: a polyline whose direction drifts a little at every one-pixel step."""
    S = img.shape[0]
    steps = int(round(rng.uniform(10, 18) * s))
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, size=steps))
    path = np.cumsum(np.stack([np.sin(angle), np.cos(angle)], axis=1), axis=0)
    path = np.vstack([[0.0, 0.0], path])
    # Shift the walk to a random place where all of it fits: clipping it at the border would draw an edge line.
    lo, hi = path.min(0), path.max(0)
    path += rng.uniform(-lo, np.maximum(S - 1 - hi, -lo))
    dist = np.min([_segment_distance(S, p, q) for p, q in zip(path[:-1], path[1:], strict=True)], axis=0)
    return img - _amplitude(img, rng) * _stroke(dist, 0.5 * s)


def _smudge(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A disc where the texture is blurred, its contrast lost and its brightness shifted (a film of oil, a wiped
    area). Removing texture changes pixels by as much as the texture varies, so it scales with contrast by
    construction; the tint is in standard deviations of the crop like the other kinds' amplitudes."""
    S = img.shape[0]
    radius = rng.uniform(3.5, 5) * s  # at most 9.3% of the image with the edge ramp; 4-7 px would pass 10%
    cy, cx = _centre(S, rng, radius * 0.6)
    ys, xs = _grid(S)
    w = np.clip(radius + 0.5 - np.hypot(ys - cy, xs - cx), 0, 1)
    blurred = ndimage.gaussian_filter(img.astype(np.float64), sigma=rng.uniform(1.0, 2.0) * s, mode="reflect")
    local_mean = float((blurred * w).sum() / w.sum())
    kept = rng.uniform(0.0, 0.3)  # fraction of the blurred texture's contrast that survives
    # A film also tints a little, darker or lighter. Without it a smudge over busy texture is plain to a person but
    # can be missed by any model of local statistics: a flat patch at the local mean is a very likely patch.
    tint = rng.choice([-1.0, 1.0]) * rng.uniform(*SMUDGE_TINT) * max(float(img.std()), 0.02)
    flat = local_mean + tint + kept * (blurred - local_mean)
    return img + w * (flat - img)


_DRAW: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "smudge": _smudge,
}
assert tuple(_DRAW) == DEFECT_KINDS


def draw_defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One local defect of `kind` on a square gray image (S, S) in [0, 1] at model size. Returns the new image
    (float32, changed pixels rounded to the 1/255 grid of a decoded PNG) and its mask (float32, 1 where the defect
    changed a pixel by more than MASK_THRESHOLD). Outside the mask the image is exactly `img`. A draw whose mask
    comes out tinier than a few pixels (clipped at 0 or 1, or a smudge over flat texture) is redrawn."""
    if kind not in _DRAW:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] < 16:
        raise ValueError(f"expected a square image (S, S) with S >= 16, got shape {img.shape}")
    s = img.shape[0] / 32
    for _ in range(_MAX_TRIES):
        out = np.round(np.clip(_DRAW[kind](img, rng, s), 0, 1) * 255) / 255
        mask = np.abs(out - img) > MASK_THRESHOLD
        if mask.sum() >= _MIN_MASK_PX * s * s:
            return np.where(mask, out, img).astype(np.float32), mask.astype(np.float32)
    raise RuntimeError(f"could not draw a visible {kind} in {_MAX_TRIES} tries on this image")


def surface_arrays(
    surface: str,
    *,
    size: int = 32,
    n_train: int = 600,
    n_test_normal: int = 100,
    n_test_defect: int = 100,
    crop: int = 64,
    seed: int = 0,
) -> SurfaceSet:
    """Train normals from the top of the photograph; test normals, then test defects, from the bottom. Defect
    kinds cycle through DEFECT_KINDS. The train, test-normal and defect streams draw from separate generators
    spawned from `seed`, so changing one count leaves the other parts as they were."""
    photo = load_photo(surface)
    train_rows, test_rows = row_ranges(photo.shape[0], crop)
    # The surface is part of the entropy: otherwise every surface would get the same windows and defect shapes.
    streams = np.random.SeedSequence([seed, SURFACES.index(surface)]).spawn(3)
    g_train, g_normal, g_defect = (np.random.default_rng(s) for s in streams)
    width = photo.shape[1]
    o_train = crop_origins(g_train, n_train, train_rows, width, crop)
    o_normal = crop_origins(g_normal, n_test_normal, test_rows, width, crop)
    o_defect = crop_origins(g_defect, n_test_defect, test_rows, width, crop)

    X_normal = cut_crops(photo, o_normal, crop, size)
    X_defect = cut_crops(photo, o_defect, crop, size)
    masks = np.zeros((n_test_normal + n_test_defect, size, size), dtype=np.float32)
    kinds = ["normal"] * n_test_normal + [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(n_test_defect)]
    for i in range(n_test_defect):
        X_defect[i, 0], masks[n_test_normal + i] = draw_defect(X_defect[i, 0], g_defect, kinds[n_test_normal + i])

    return SurfaceSet(
        surface=surface,
        X_train=cut_crops(photo, o_train, crop, size),
        X_test=np.concatenate([X_normal, X_defect]),
        y_test=np.r_[np.zeros(n_test_normal), np.ones(n_test_defect)].astype(np.int8),
        mask_test=masks,
        kind_test=np.array(kinds, dtype=str),
        origin_train=o_train,
        origin_test=np.concatenate([o_normal, o_defect]),
        crop=crop,
    )

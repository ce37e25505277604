"""Procedural X-ray views of solder joints: normals and six defect kinds, for tests and the demo.

Transmission X-ray physics, roughly: the board is a light background, and each material darkens it by
Beer-Lambert attenuation, `I = background * exp(-mu * density)`. Solder (tin/lead) is dense and shows dark,
copper leads and pads mid-gray, traces faint. Coordinates are normalised to [-1, 1] so one scene renders
at any size. Everything is vectorised on coordinate grids; one 128x128 image takes about 1.3 ms.

A render draws the scene first, then a noise seed, then the defect, all from the same generator. So a
normal and a defect rendered from equally seeded generators differ only by the defect, which lets tests
check that each defect is visible on its own. The same pairing, before noise, gives each defect's mask
(render_defect_with_mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from aae_ray.data import DEFECT, NORMAL, raster
from aae_ray.data.images import ImageRecord, stable_id

DEFECT_KINDS: tuple[str, ...] = ("void", "bridge", "insufficient", "excess", "particle", "deformed")
SIZES = (32, 64, 128)
# A mask pixel is one where the defect changed the noise-free image by more than this (intensity, 1.0 = white):
# above uint8 rounding (0.5/255), so blur tails that leave the stored image unchanged are not defect, and under
# the faintest sensor noise (read noise alone is 1.5-3.8/255), so no visible change is left out. Measured over
# every kind and size: mask areas shrink by under a third from 1/255 to 8/255 (a defect's largest change is
# 57-160/255), so the exact value hardly matters.
MASK_THRESHOLD = 2 / 255

# Split fractions, in the order train, val, test, pool (see make_synthetic_records).
_NORMAL_SPLITS = (("train", 0.55), ("val", 0.10), ("test", 0.15), ("pool", 0.20))
_DEFECT_SPLITS = (("train", 0.10), ("val", 0.20), ("test", 0.35), ("pool", 0.35))
_MIN_DEFECT_TRAIN = 2  # the "few confirmed defects" must be at least a pair once there are enough


@dataclass(frozen=True)
class _Blob:
    """A solder dome: an ellipse whose outline may wobble (harmonics), densest in the middle."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    peak: float
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, relative amplitude, phase)
    tilt: float = 0.0  # thickness gradient along the blob's own y: a fillet is thickest at the heel


@dataclass(frozen=True)
class _Scene:
    """Everything a render needs except noise. Coordinates are the scene's own, before jitter/rotation."""

    shift: tuple[float, float]
    rotation: float
    background: float
    mu: float
    texture_seed: int
    pitch: float
    pad_half: tuple[float, float]
    pad_density: float
    lead_half_width: float
    lead_density: float
    body_edge: float
    body_density: float
    traces: tuple[tuple[float, float, float], ...]  # (x at pad, x at bottom edge, half-width)
    joint: _Blob
    neighbours: tuple[_Blob, ...]
    blur_px: float  # at 128 px; scaled with size
    gauss_noise: float
    photons: float


@dataclass(frozen=True)
class _Defect:
    """What a defect adds to a scene: holes in the joint, a solder streak, extra blobs."""

    voids: tuple[tuple[float, float, float, float], ...] = ()  # (cx, cy, radius, depth)
    bridge: tuple[float, float, float, float, float, float] | None = None  # (x0, y0, x1, y1, half_w, peak)
    blobs: tuple[_Blob, ...] = ()  # loose balls, a spill lobe, a swelling: extra solder


def render_normal(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One normal solder joint as uint8 (size, size)."""
    _check_size(size)
    scene = _draw_scene(rng)
    noise_seed = int(rng.integers(2**63))
    return _render(scene, _Defect(), noise_seed, size)


def render_defect(rng: np.random.Generator, kind: str, size: int = 128) -> np.ndarray:
    """One defective solder joint of `kind` (one of DEFECT_KINDS) as uint8 (size, size)."""
    _, scene, defect, noise_seed = _draw_defective(rng, kind, size)
    return _render(scene, defect, noise_seed, size)


def render_defect_with_mask(rng: np.random.Generator, kind: str, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """`render_defect` and where the defect is: the same uint8 image (rng consumed alike) and a bool (size, size)
    mask of the pixels where the defect changed the noise-free image by more than MASK_THRESHOLD."""
    original, scene, defect, noise_seed = _draw_defective(rng, kind, size)
    clean = _render_clean(scene, defect, size)
    mask = np.abs(clean - _render_clean(original, _Defect(), size)) > MASK_THRESHOLD
    return _add_noise(clean, scene, noise_seed), mask


def make_synthetic_records(
    *, seed: int = 0, n_normal: int = 600, n_defect: int = 60, size: int = 128
) -> list[ImageRecord]:
    """A labeled synthetic data set: normals then defects, splits shuffled with `seed`.

    Image i depends only on (seed, normal/defect, i), so growing `n_normal` keeps the existing images.
    Defect kinds cycle through DEFECT_KINDS so every kind is equally represented. Defects carry their mask
    (uint8 0/255, render_defect_with_mask); normals have none (None: smaller than an all-zero PNG, same meaning).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_normal < 10:
        raise ValueError(f"n_normal must be >= 10, got {n_normal}")
    if n_defect < 0:
        raise ValueError(f"n_defect must be >= 0, got {n_defect}")
    _check_size(size)
    split_rng = np.random.default_rng([seed, 2])
    normal_splits = split_rng.permutation(_split_labels(n_normal, _NORMAL_SPLITS, min_train=0))
    defect_min_train = _MIN_DEFECT_TRAIN if n_defect >= 8 else 0
    defect_splits = split_rng.permutation(_split_labels(n_defect, _DEFECT_SPLITS, min_train=defect_min_train))
    records = []
    for i, split in enumerate(normal_splits):
        pixels = render_normal(np.random.default_rng([seed, 0, i]), size)
        id_ = stable_id("synthetic", str(seed), f"normal-{i}")
        records.append(ImageRecord(id_, pixels, "synthetic:normal", str(split), NORMAL))
    for i, split in enumerate(defect_splits):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        pixels, mask = render_defect_with_mask(np.random.default_rng([seed, 1, i]), kind, size)
        id_ = stable_id("synthetic", str(seed), f"defect-{i}")
        mask_u8 = mask.astype(np.uint8) * 255
        records.append(ImageRecord(id_, pixels, f"synthetic:{kind}", str(split), DEFECT, mask=mask_u8))
    return records


def _draw_defective(rng: np.random.Generator, kind: str, size: int) -> tuple[_Scene, _Scene, _Defect, int]:
    """The draws of one defect render, in render order: (scene without the defect, scene with it, defect,
    noise seed). Insufficient, excess and deformed change the joint itself, so the two scenes differ."""
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; allowed: {list(DEFECT_KINDS)}")
    _check_size(size)
    original = _draw_scene(rng)
    noise_seed = int(rng.integers(2**63))
    scene, defect = _DRAW_DEFECT[kind](rng, original)
    return original, scene, defect, noise_seed


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size}")


def _split_labels(n: int, fractions: tuple[tuple[str, float], ...], min_train: int) -> list[str]:
    """Exactly n labels in the given fractions; train (first) gets at least `min_train`."""
    (first, first_frac), *rest = fractions
    n_first = min(n, max(round(n * first_frac), min_train))
    # Cumulative rounding of the remaining fractions: the counts always sum to what is left.
    remaining = n - n_first
    total = sum(frac for _, frac in rest)
    labels = [first] * n_first
    cum, done = 0.0, 0
    for name, frac in rest:
        cum += frac / total
        upto = round(cum * remaining)
        labels += [name] * (upto - done)
        done = upto
    return labels


# --- scene and defect parameters ------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator) -> _Scene:
    """Random but plausible normal joint: jitter in placement, size, brightness, blur and noise."""
    jy = rng.uniform(0.10, 0.22)
    rx, ry = rng.uniform(0.25, 0.30), rng.uniform(0.30, 0.37)
    peak = rng.uniform(0.85, 1.0)
    joint = _Blob(
        cx=rng.normal(0.0, 0.02),
        cy=jy,
        rx=rx,
        ry=ry,
        angle=rng.normal(0.0, 0.05),
        peak=peak,
        harmonics=_wobble(rng, amplitude=0.035),
        tilt=rng.uniform(0.15, 0.3),
    )
    pitch = rng.uniform(1.05, 1.2)
    # The neighbouring joints of the same row, mostly cut off by the image edge.
    neighbours = tuple(
        _Blob(
            cx=side * pitch + rng.normal(0.0, 0.02),
            cy=jy + rng.normal(0.0, 0.02),
            rx=rx * rng.uniform(0.92, 1.08),
            ry=ry * rng.uniform(0.92, 1.08),
            angle=rng.normal(0.0, 0.05),
            peak=peak * rng.uniform(0.93, 1.07),
            tilt=rng.uniform(0.15, 0.3),
        )
        for side in (-1, 1)
    )
    n_traces = int(rng.integers(0, 3))
    traces = tuple(
        (rng.uniform(-0.15, 0.15), rng.uniform(-0.6, 0.6), rng.uniform(0.025, 0.04)) for _ in range(n_traces)
    )
    return _Scene(
        shift=(rng.normal(0.0, 0.05), rng.normal(0.0, 0.05)),
        rotation=rng.normal(0.0, 0.05),
        background=rng.uniform(0.74, 0.9),
        mu=rng.uniform(1.5, 1.9),
        texture_seed=int(rng.integers(2**63)),
        pitch=pitch,
        pad_half=(rng.uniform(0.30, 0.36), rng.uniform(0.38, 0.46)),
        pad_density=rng.uniform(0.08, 0.14),
        lead_half_width=rng.uniform(0.09, 0.12),
        lead_density=rng.uniform(0.3, 0.42),
        body_edge=rng.uniform(-0.82, -0.66),
        body_density=rng.uniform(0.45, 0.6),
        traces=traces,
        joint=joint,
        neighbours=neighbours,
        blur_px=rng.uniform(0.6, 1.4),
        gauss_noise=rng.uniform(0.006, 0.015),
        photons=rng.uniform(600.0, 2000.0),
    )


def _wobble(rng: np.random.Generator, amplitude: float) -> tuple[tuple[int, float, float], ...]:
    """Low-order outline harmonics: a real fillet is never a perfect ellipse."""
    return tuple((k, rng.uniform(0.3, 1.0) * amplitude, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))


def _draw_void(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    voids = []
    for i in range(int(rng.integers(1, 4))):
        # The first void is the big one, so every void image has at least one clearly visible hole.
        radius = rng.uniform(0.11, 0.15) if i == 0 else rng.uniform(0.05, 0.09)
        r, t = rng.uniform(0.0, 0.45), rng.uniform(0, 2 * math.pi)
        cx, cy = j.cx + r * j.rx * math.cos(t), j.cy + r * j.ry * math.sin(t)
        voids.append((cx, cy, radius, rng.uniform(0.75, 0.95)))
    return scene, _Defect(voids=tuple(voids))


def _draw_bridge(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    target = scene.neighbours[int(rng.integers(2))]
    y0 = j.cy + rng.uniform(-0.4, 0.4) * j.ry
    y1 = target.cy + rng.uniform(-0.4, 0.4) * target.ry
    half_w = rng.uniform(0.06, 0.09)
    bridge = (j.cx, y0, target.cx, y1, half_w, rng.uniform(0.65, 0.9))
    # Solder wets the gap unevenly: a flat swelling somewhere along the streak.
    t = rng.uniform(0.3, 0.7)
    r = half_w * rng.uniform(1.2, 1.5)
    angle = math.atan2(y1 - y0, target.cx - j.cx)
    swell = _Blob(j.cx + t * (target.cx - j.cx), y0 + t * (y1 - y0), 2.5 * r, r, angle, rng.uniform(0.3, 0.5))
    return scene, _Defect(bridge=bridge, blobs=(swell,))


def _draw_insufficient(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    scale = rng.uniform(0.4, 0.55)
    joint = replace(j, rx=j.rx * scale, ry=j.ry * scale, peak=j.peak * rng.uniform(0.45, 0.65))
    return replace(scene, joint=joint), _Defect()


def _draw_excess(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    # Excess solder balloons sideways more than along the lead: the blob becomes round and bulging.
    joint = replace(j, rx=j.rx * rng.uniform(1.5, 1.75), ry=j.ry * rng.uniform(1.25, 1.45), peak=rng.uniform(1.1, 1.25))
    return replace(scene, joint=joint), _Defect()


def _draw_particle(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    balls = []
    for i in range(int(rng.integers(2, 6))):
        radius = rng.uniform(0.065, 0.085) if i == 0 else rng.uniform(0.04, 0.075)
        # Around the joint but off it, mostly beside and below it (the body hides what is above).
        t, d = rng.uniform(-0.2 * math.pi, 1.2 * math.pi), rng.uniform(1.3, 1.9)
        cx, cy = j.cx + d * j.rx * math.cos(t), j.cy + d * j.ry * math.sin(t)
        balls.append(_Blob(cx, cy, radius, radius, 0.0, rng.uniform(0.8, 1.0)))
    return scene, _Defect(blobs=tuple(balls))


def _draw_deformed(rng: np.random.Generator, scene: _Scene) -> tuple[_Scene, _Defect]:
    j = scene.joint
    lumpy = tuple((k, rng.uniform(0.12, 0.22), rng.uniform(0, 2 * math.pi)) for k in (1, 2, 3))
    jagged = ((int(rng.integers(6, 11)), rng.uniform(0.04, 0.07), rng.uniform(0, 2 * math.pi)),)
    side = 1.0 if rng.random() < 0.5 else -1.0
    joint = replace(
        j,
        cx=j.cx + side * rng.uniform(0.04, 0.1),
        rx=j.rx * rng.uniform(1.0, 1.2),
        angle=j.angle + side * rng.uniform(0.3, 0.6),
        harmonics=lumpy + jagged,
    )
    # A spill lobe on one side makes the joint lopsided, not just rough.
    t = rng.uniform(0, 2 * math.pi)
    lobe_r = rng.uniform(0.12, 0.17)
    lobe = _Blob(
        j.cx + 0.9 * j.rx * math.cos(t),
        j.cy + 0.9 * j.ry * math.sin(t),
        lobe_r * rng.uniform(1.0, 1.5),
        lobe_r,
        rng.uniform(0, math.pi),
        rng.uniform(0.6, 0.85),
        harmonics=((5, 0.1, rng.uniform(0, 2 * math.pi)),),
    )
    return replace(scene, joint=joint), _Defect(blobs=(lobe,))


_DRAW_DEFECT = {
    "void": _draw_void,
    "bridge": _draw_bridge,
    "insufficient": _draw_insufficient,
    "excess": _draw_excess,
    "particle": _draw_particle,
    "deformed": _draw_deformed,
}
assert set(_DRAW_DEFECT) == set(DEFECT_KINDS)


# --- rendering ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Scene coordinates of every pixel, and the way back to find the pixels near a scene point.

    Drawing each element only inside its window is what keeps a render near a millisecond.
    """

    x: np.ndarray
    y: np.ndarray
    shift: tuple[float, float]
    cos: float
    sin: float

    def window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels within `reach` (scene units, per axis) of (cx, cy)."""
        size = self.x.shape[0]
        px = self.cos * cx - self.sin * cy + self.shift[0]
        py = self.sin * cx + self.cos * cy + self.shift[1]
        return _span(py, reach, size), _span(px, reach, size)


def _span(center: float, reach: float, size: int) -> slice:
    lo = math.floor((center - reach + 1.0) / 2.0 * size) - 1
    hi = math.ceil((center + reach + 1.0) / 2.0 * size) + 1
    return slice(min(max(lo, 0), size), max(min(hi, size), 0))


def _render(scene: _Scene, defect: _Defect, noise_seed: int, size: int) -> np.ndarray:
    """Scene + defect -> noisy blurred uint8 image."""
    return _add_noise(_render_clean(scene, defect, size), scene, noise_seed)


def _render_clean(scene: _Scene, defect: _Defect, size: int) -> np.ndarray:
    """Scene + defect -> blurred intensity image before noise (float, 1.0 = white): what a mask compares."""
    grid = _make_grid(scene, size)
    density = _board_density(scene, grid)
    solder = np.zeros_like(density)
    _add_blob(solder, grid, scene.joint)
    for cx, cy, radius, depth in defect.voids:
        # A gas void removes solder along the beam, so the hole is brighter than the surrounding joint.
        win = grid.window(cx, cy, radius + 0.03)
        solder[win] *= 1.0 - depth * raster.disc(grid.x[win], grid.y[win], cx, cy, radius, edge=0.03)
    for blob in (*scene.neighbours, *defect.blobs):
        _add_blob(solder, grid, blob)
    if defect.bridge is not None:
        x0, y0, x1, y1, half_w, peak = defect.bridge
        win = grid.window((x0 + x1) / 2, (y0 + y1) / 2, max(abs(x1 - x0), abs(y1 - y0)) / 2 + half_w)
        solder[win] += raster.capsule(grid.x[win], grid.y[win], *defect.bridge)
    density += solder
    image = scene.background * raster.texture(scene.texture_seed, size) * np.exp(-scene.mu * density)
    return raster.blur(image, scene.blur_px * size / 128)


def _make_grid(scene: _Scene, size: int) -> _Grid:
    """Pixel grid -> scene coordinates: the small shift and rotation of the part under the X-ray."""
    u = raster.axis(size)
    c, s = math.cos(scene.rotation), math.sin(scene.rotation)
    px = u[None, :] - scene.shift[0]
    py = u[:, None] - scene.shift[1]
    return _Grid(c * px + s * py, -s * px + c * py, scene.shift, c, s)




def _board_density(scene: _Scene, grid: _Grid) -> np.ndarray:
    """Pads, leads, traces and the component body: everything but solder."""
    x, y = grid.x, grid.y
    pw, ph = scene.pad_half
    jy = scene.joint.cy
    density = scene.body_density * raster.ramp(y - scene.body_edge, 0.03, rising=False)
    # The lead runs from the body down into the fillet and ends inside it.
    lead_top, lead_end = scene.body_edge - 0.05, jy + 0.1
    lead_mid, lead_half = (lead_top + lead_end) / 2, (lead_end - lead_top) / 2
    for cx in (-scene.pitch, 0.0, scene.pitch):
        win = grid.window(cx, jy, max(pw, ph) + 0.02)
        density[win] += scene.pad_density * raster.box(x[win] - cx, y[win] - jy, pw, ph, edge=0.02)
        win = grid.window(cx, lead_mid, lead_half + 0.02)
        density[win] += scene.lead_density * raster.box(
            x[win] - cx, y[win] - lead_mid, scene.lead_half_width, lead_half, edge=0.02
        )
    for x_pad, x_edge, half_w in scene.traces:
        # From the pad's lower edge out past the bottom of the image.
        y0, y1 = jy + ph, 1.2
        win = grid.window((x_pad + x_edge) / 2, (y0 + y1) / 2, max(abs(x_edge - x_pad), y1 - y0) / 2 + half_w)
        density[win] += 0.07 * raster.capsule_mask(x[win], y[win], x_pad, y0, x_edge, y1, half_w)
    return density


def _add_blob(out: np.ndarray, grid: _Grid, b: _Blob) -> None:
    reach = max(b.rx, b.ry) * (1.0 + sum(amp for _, amp, _ in b.harmonics))
    win = grid.window(b.cx, b.cy, reach)
    out[win] += _blob(b, grid.x[win], grid.y[win])


def _blob(b: _Blob, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Solder thickness of a flattened dome: densest in the middle, fading towards the rim."""
    c, s = math.cos(b.angle), math.sin(b.angle)
    dx, dy = x - b.cx, y - b.cy
    u = (c * dx + s * dy) / b.rx
    v = (-s * dx + c * dy) / b.ry
    rho2 = u * u + v * v
    if b.harmonics:
        phi = np.arctan2(v, u)
        outline = np.ones_like(phi)
        for k, amp, phase in b.harmonics:
            outline += amp * np.cos(k * phi + phase)
        rho2 = rho2 / np.maximum(outline, 0.3) ** 2
    # Exponent above a sphere's 0.5: the rim of a wetted fillet is thinner than a ball's.
    thickness = b.peak * np.clip(1.0 - rho2, 0.0, 1.0) ** 0.7
    return thickness * (1.0 - b.tilt * v) if b.tilt else thickness


def _add_noise(image: np.ndarray, scene: _Scene, noise_seed: int) -> np.ndarray:
    """Sensor noise: Gaussian read noise plus photon (Poisson-like) noise that grows with brightness."""
    rng = np.random.default_rng(noise_seed)
    sigma = np.sqrt(scene.gauss_noise**2 + np.maximum(image, 0.0) / scene.photons)
    noisy = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(noisy * 255.0 + 0.5, 0, 255).astype(np.uint8)

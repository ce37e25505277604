import numpy as np
import pytest
from scipy import ndimage

from aae_ray.data import corruptions
from aae_ray.data.corruptions import KINDS, MIN_CHANGE, corrupt, corrupt_one
from aae_ray.data.synthetic import render_normal
from aae_ray.scoring import auroc


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random blurred noise stretched to [0, 1]: texture everywhere, no background."""
    x = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 8)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def _disk(rng: np.random.Generator, size: int, bright: bool = True, jitter: float = 0.03) -> np.ndarray:
    """A part on a plain background (light on dark, or dark on light), slightly moved, with sensor noise."""
    cy, cx = size / 2 + rng.normal(0, jitter * size, 2)
    yy, xx = np.indices((size, size))
    part, background = (0.8, 0.1) if bright else (0.15, 0.75)
    img = np.where(np.hypot(yy - cy, xx - cx) < 0.3 * size, part, background) + rng.normal(0, 0.02, (size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def _varied(size: int, n: int = 60, seed: int = 0) -> np.ndarray:
    """Smooth textures, light and dark parts on plain backgrounds and X-ray solder joints, as (n, S, S)."""
    rng = np.random.default_rng(seed)
    makers = [
        lambda: _smooth(rng, size),
        lambda: _disk(rng, size, bright=True),
        lambda: _disk(rng, size, bright=False),
        lambda: render_normal(rng, size).astype(np.float32) / 255,
    ]
    return np.stack([makers[i % len(makers)]() for i in range(n)])


def test_corrupt_keeps_shape_dtype_and_range_and_leaves_the_input_alone():
    X = _varied(32, n=40)[:, None]
    before = X.copy()
    out = corrupt(X, np.random.default_rng(0))
    assert out.shape == X.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out is not X and np.array_equal(X, before)


def test_corrupt_is_deterministic_per_seed():
    X = _varied(32, n=20)[:, None]
    a, b = corrupt(X, np.random.default_rng(5)), corrupt(X, np.random.default_rng(5))
    c = corrupt(X, np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_changes_every_image_visibly_and_locally(kind):
    rng = np.random.default_rng(1)
    for img in _varied(32):
        out = corrupt_one(img, kind, rng)
        diff = np.abs(out - img)
        assert diff.mean() > MIN_CHANGE, kind
        # Local: most of the image is left exactly as it was.
        assert (diff < 1e-6).mean() > 0.75, kind


@pytest.mark.parametrize("size", [32, 64])
def test_kinds_are_visible_on_their_own_not_through_the_fallback(size, monkeypatch):
    """The bright-blob fallback guarantees a visible change, but on ordinary images it should rarely be needed,
    or the kinds would all look alike."""
    used = []
    fallback = corruptions._fallback
    monkeypatch.setattr(corruptions, "_fallback", lambda *a: used.append(1) or fallback(*a))
    rng = np.random.default_rng(2)
    images = _varied(size, n=80, seed=size)
    for kind in KINDS:
        used.clear()
        for img in images:
            corrupt_one(img, kind, rng)
        assert len(used) <= 0.1 * len(images), kind


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("size", [8, 32])
def test_flat_images_still_change(level, size):
    rng = np.random.default_rng(3)
    img = np.full((size, size), level, dtype=np.float32)
    for kind in KINDS:
        assert np.abs(corrupt_one(img, kind, rng) - img).mean() > MIN_CHANGE, kind


@pytest.mark.parametrize("size", [8, 32, 128])
def test_corrupt_works_at_small_and_large_sizes(size):
    X = _varied(size, n=12, seed=size)[:, None] if size >= 32 else _smooth_and_disks(size)
    out = corrupt(X, np.random.default_rng(4))
    assert out.shape == X.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert (np.abs(out - X).mean(axis=(1, 2, 3)) > MIN_CHANGE).all()


def _smooth_and_disks(size: int) -> np.ndarray:
    rng = np.random.default_rng(size)
    return np.stack([_smooth(rng, size) if i % 2 else _disk(rng, size) for i in range(12)])[:, None]


def test_empty_input_gives_empty_output():
    out = corrupt(np.zeros((0, 1, 32, 32), dtype=np.float32), np.random.default_rng(0))
    assert out.shape == (0, 1, 32, 32) and out.dtype == np.float32


@pytest.mark.parametrize(
    "shape",
    [(4, 32, 32), (4, 3, 32, 32), (4, 1, 32, 16), (32, 32), (2, 1, 1, 32, 32), (4, 1, 2, 2)],
)
def test_corrupt_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros(shape, dtype=np.float32), np.random.default_rng(0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_corrupt_rejects_non_finite_values(bad):
    X = np.zeros((3, 1, 16, 16), dtype=np.float32)
    X[1, 0, 4, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        corrupt(X, np.random.default_rng(0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, 255.0])
def test_corrupt_rejects_values_outside_unit_range(bad):
    X = np.zeros((3, 1, 16, 16), dtype=np.float32)
    X[2, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(X, np.random.default_rng(0))


def test_corrupt_one_rejects_unknown_kind_and_bad_images():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown corruption kind 'crack'"):
        corrupt_one(np.zeros((16, 16), dtype=np.float32), "crack", rng)
    for shape in [(16, 8), (1, 16, 16), (16,)]:
        with pytest.raises(ValueError, match="shape"):
            corrupt_one(np.zeros(shape, dtype=np.float32), "blob", rng)
    with pytest.raises(ValueError, match="NaN or infinite"):
        corrupt_one(np.full((16, 16), np.nan, dtype=np.float32), "blob", rng)


def test_corruptions_are_detectable_by_a_trivial_score():
    """If even the mean absolute deviation from the mean normal separates them, a model that cannot is failing at
    the easy part, which is what the tuning objective needs to tell."""
    rng = np.random.default_rng(7)
    train = np.stack([_disk(rng, 32, jitter=0.01) for _ in range(200)])
    held_out = np.stack([_disk(rng, 32, jitter=0.01) for _ in range(200)])[:, None]
    corrupted = corrupt(held_out, rng)
    X = np.concatenate([held_out, corrupted])[:, 0]
    y = np.r_[np.zeros(len(held_out)), np.ones(len(corrupted))]
    score = np.abs(X - train.mean(axis=0)).mean(axis=(1, 2))
    assert auroc(y, score) > 0.9

from collections import Counter

import numpy as np
import pytest

from aae_ray.data import DEFECT, NORMAL, SPLITS
from aae_ray.data.images import stable_id
from aae_ray.data.synthetic import DEFECT_KINDS, make_synthetic_records, render_defect, render_normal


def _at_32(pixels: np.ndarray) -> np.ndarray:
    """Block-mean downscale to 32x32, roughly what the model sees."""
    f = pixels.shape[0] // 32
    return pixels.astype(np.float32).reshape(32, f, 32, f).mean(axis=(1, 3))


def _counts(records, truth):
    return Counter(r.split for r in records if r.truth == truth)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_renders_are_uint8_squares(size):
    rng = np.random.default_rng(0)
    images = [render_normal(rng, size)] + [render_defect(rng, kind, size) for kind in DEFECT_KINDS]
    for img in images:
        assert img.dtype == np.uint8
        assert img.shape == (size, size)
        # Not blank or saturated: a light board with dark solder on it.
        assert img.min() < 90 < 170 < img.max()


def test_records_are_deterministic_per_seed():
    a = make_synthetic_records(seed=3, n_normal=12, n_defect=8, size=32)
    b = make_synthetic_records(seed=3, n_normal=12, n_defect=8, size=32)
    c = make_synthetic_records(seed=4, n_normal=12, n_defect=8, size=32)
    assert [(r.id, r.split, r.source, r.truth) for r in a] == [(r.id, r.split, r.source, r.truth) for r in b]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    assert not {r.id for r in a} & {r.id for r in c}
    assert all(not np.array_equal(x.pixels, y.pixels) for x, y in zip(a, c, strict=True))


def test_ids_sources_and_truth():
    records = make_synthetic_records(seed=5, n_normal=10, n_defect=12, size=32)
    assert records[0].id == stable_id("synthetic", "5", "normal-0")
    assert records[10].id == stable_id("synthetic", "5", "defect-0")
    assert len({r.id for r in records}) == len(records)
    assert {r.source for r in records[:10]} == {"synthetic:normal"}
    assert {r.truth for r in records[:10]} == {NORMAL}
    assert {r.truth for r in records[10:]} == {DEFECT}
    # Kinds cycle, so 12 defects hold every kind twice.
    assert Counter(r.source for r in records[10:]) == {f"synthetic:{k}": 2 for k in DEFECT_KINDS}


def test_image_depends_only_on_its_index():
    small = make_synthetic_records(seed=1, n_normal=10, n_defect=2, size=32)
    large = make_synthetic_records(seed=1, n_normal=15, n_defect=4, size=32)
    by_id = {r.id: r.pixels for r in large}
    assert all(np.array_equal(r.pixels, by_id[r.id]) for r in small)


def test_split_fractions():
    records = make_synthetic_records(seed=0, n_normal=100, n_defect=60, size=32)
    assert _counts(records, NORMAL) == {"train": 55, "val": 10, "test": 15, "pool": 20}
    assert _counts(records, DEFECT) == {"train": 6, "val": 12, "test": 21, "pool": 21}
    assert {r.split for r in records} == set(SPLITS)


def test_splits_are_shuffled():
    records = make_synthetic_records(seed=0, n_normal=100, n_defect=0, size=32)
    head = [r.split for r in records[:55]]
    assert len(set(head)) > 1
    other = make_synthetic_records(seed=1, n_normal=100, n_defect=0, size=32)
    assert [r.split for r in other] != [r.split for r in records]


@pytest.mark.parametrize("n_defect", range(0, 15))
def test_small_defect_counts_add_up(n_defect):
    records = make_synthetic_records(seed=2, n_normal=10, n_defect=n_defect, size=32)
    counts = _counts(records, DEFECT)
    assert sum(counts.values()) == n_defect
    if n_defect >= 8:
        assert counts["train"] >= 2
    assert sum(_counts(records, NORMAL).values()) == 10


@pytest.mark.parametrize(
    "kwargs",
    [{"n_normal": 9}, {"n_defect": -1}, {"size": 100}, {"size": 256}, {"seed": -1}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        make_synthetic_records(**{"n_normal": 10, "n_defect": 0, "size": 32, **kwargs})


def test_bad_render_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect kind 'crack'"):
        render_defect(rng, "crack")
    with pytest.raises(ValueError, match="size"):
        render_normal(rng, 48)
    with pytest.raises(ValueError, match="size"):
        render_defect(rng, "void", 16)


# A defect rendered from an equally seeded generator shares the normal's scene and noise, so the
# difference is the defect alone. Sign: +1 the defect makes part of the joint brighter (less solder),
# -1 darker (more solder), 0 both (solder moved).
_EFFECT = {"void": 1, "insufficient": 1, "bridge": -1, "excess": -1, "particle": -1, "deformed": 0}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_is_visible_at_32px(kind):
    assert set(_EFFECT) == set(DEFECT_KINDS)
    for seed in range(8):
        normal = _at_32(render_normal(np.random.default_rng(seed), 64))
        defect = _at_32(render_defect(np.random.default_rng(seed), kind, 64))
        diff = defect - normal
        brighter, darker = diff.max(), -diff.min()
        # ~40 gray levels on a 32x32 block mean: far above noise, which the pairing cancels anyway.
        if _EFFECT[kind] >= 0:
            assert brighter > 40, (kind, seed, brighter)
        if _EFFECT[kind] <= 0:
            assert darker > 40, (kind, seed, darker)


def test_global_defects_lie_outside_the_normals():
    # Size and bridge defects change the whole joint, so even a nearest-neighbour distance at 32x32
    # (which jitter and brightness blur for normals) separates them from every normal.
    normals = np.stack([_at_32(render_normal(np.random.default_rng([7, i]), 32)).ravel() for i in range(120)])

    def nearest(x, skip=None):
        d = np.sqrt(((normals - x) ** 2).mean(axis=1))
        if skip is not None:
            d[skip] = np.inf
        return d.min()

    normal_nn = np.array([nearest(normals[i], skip=i) for i in range(40)])
    for kind in ("bridge", "insufficient", "excess"):
        nn = [nearest(_at_32(render_defect(np.random.default_rng([8, i]), kind, 32)).ravel()) for i in range(10)]
        assert np.mean(nn) > np.percentile(normal_nn, 90), kind


def test_normals_vary():
    images = np.stack([render_normal(np.random.default_rng([11, i]), 64) for i in range(30)]).astype(np.float32)
    brightness = images.mean(axis=(1, 2))
    assert brightness.std() > 3
    # Position of the central joint: centroid of the dark pixels in the middle columns.
    rows, cols = np.mgrid[0:64, 0:64]
    centres = []
    for img in images:
        dark = (img < np.percentile(img, 8)) & (np.abs(cols - 32) < 16) & (rows > 20)
        centres.append((rows[dark].mean(), cols[dark].mean()))
    assert np.std(centres, axis=0).min() > 0.5
    # Every normal is its own picture, not the same scene with different noise.
    assert np.abs(images[0] - images[1]).mean() > 5

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from aae_ray.data import DEFECT, NORMAL, SPLITS
from aae_ray.data.images import decode_image, encode_png, mask_arrays, read_table, stable_id, to_model_input
from aae_ray.data.synthetic import (
    DEFECT_KINDS,
    make_synthetic_records,
    render_defect,
    render_defect_with_mask,
    render_normal,
)


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


# --- masks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_is_where_the_defect_differs_from_its_same_seed_normal(kind):
    # Equally seeded generators share scene and noise seed, so outside the defect the pair differs only by
    # the sub-threshold noise-free change (MASK_THRESHOLD) plus rounding, and inside by the defect.
    for size in (32, 64, 128):
        for seed in range(6):
            image, mask = render_defect_with_mask(np.random.default_rng([seed, 3]), kind, size)
            assert mask.dtype == bool and mask.shape == (size, size)
            assert np.array_equal(image, render_defect(np.random.default_rng([seed, 3]), kind, size))
            diff = image.astype(np.int16) - render_normal(np.random.default_rng([seed, 3]), size)
            assert mask.any(), (kind, size, seed)
            # Under the faintest read noise (1.5 gray levels) plus rounding: the mask leaves out nothing visible.
            assert np.abs(diff[~mask]).max() <= 3, (kind, size, seed)
            assert np.abs(diff[mask]).mean() > 15, (kind, size, seed)
            brighter = (diff[mask] > 0).mean()
            if _EFFECT[kind] > 0:
                assert brighter > 0.95, (kind, size, seed, brighter)
            elif _EFFECT[kind] < 0:
                assert brighter < 0.05, (kind, size, seed, brighter)
            else:
                assert 0.05 < brighter < 0.95, (kind, size, seed, brighter)


def test_void_mask_lies_inside_the_joint():
    for seed in range(10):
        _, mask = render_defect_with_mask(np.random.default_rng([seed, 4]), "void", 64)
        normal = render_normal(np.random.default_rng([seed, 4]), 64)
        # The joint is the dark solder; a void can only remove solder that is there.
        assert (normal[mask] < np.median(normal)).all(), seed
        assert mask.mean() < 0.1, seed  # a hole in the joint, not the joint


def test_records_carry_the_masks_of_their_defects():
    records = make_synthetic_records(seed=6, n_normal=10, n_defect=12, size=32)
    assert all(r.mask is None for r in records if r.truth == NORMAL)
    defects = [r for r in records if r.truth == DEFECT]
    for i, r in enumerate(defects):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        image, mask = render_defect_with_mask(np.random.default_rng([6, 1, i]), kind, 32)
        assert np.array_equal(r.pixels, image)
        assert r.mask.dtype == np.uint8 and set(np.unique(r.mask)) == {0, 255}
        assert np.array_equal(r.mask == 255, mask), (i, kind)


def test_init_writes_a_mask_for_every_defect_and_none_for_normals(synthetic_ws):
    table = read_table(synthetic_ws / "data" / "images.parquet")
    assert table.schema.field("mask").type == pa.binary()
    rows = table.select(["truth", "height", "width", "mask"]).to_pylist()
    assert sum(r["truth"] == DEFECT for r in rows) == 24
    for r in rows:
        if r["truth"] == NORMAL:
            assert r["mask"] is None
            continue
        mask = decode_image(r["mask"])
        assert mask.shape == (r["height"], r["width"])
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()


def test_mask_arrays_resize_like_the_model_input():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:30, 20:44] = 255  # on even rows/columns: exactly whole 2x2 blocks at 32
    thin = np.zeros((64, 64), dtype=np.uint8)
    thin[:, 7] = 255  # a quarter of each block's weight at 32 px: under half, so gone
    out = mask_arrays([encode_png(mask), None, encode_png(thin)], 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    expected = np.zeros((32, 32), dtype=np.float32)
    expected[5:15, 10:22] = 1.0
    assert np.array_equal(out[0], expected)
    assert not out[1].any() and not out[2].any()
    # Upscaling by 2 doubles every pixel, nothing moves.
    assert np.array_equal(mask_arrays([encode_png(mask)], 128)[0], np.kron(mask > 0, np.ones((2, 2))))


@pytest.mark.parametrize(("size", "target"), [(128, 32), (64, 32), (32, 64)])
def test_mask_arrays_line_up_with_to_model_input(size, target):
    # The same filter as the images: the mask pushed through to_model_input and thresholded is the same mask,
    # up to a rare tie that to_model_input's uint8 rounding breaks the other way.
    masks = [render_defect_with_mask(np.random.default_rng([s, 5]), k, size)[1] for s in range(3) for k in DEFECT_KINDS]
    pngs = [encode_png(m.astype(np.uint8) * 255) for m in masks]
    got = mask_arrays(pngs, target)
    assert set(np.unique(got)) == {0.0, 1.0}
    assert (got != (to_model_input(pngs, target)[:, 0] >= 0.5)).mean() < 1e-3
    if target == 32:
        # Against a plain block mean: they disagree only on the defect's rim, never on a clear block.
        blocks = np.stack([_at_32(m.astype(np.float32)) for m in masks])
        differ = got != (blocks >= 0.5)
        assert (np.abs(blocks[differ] - 0.5) <= 0.25).all()

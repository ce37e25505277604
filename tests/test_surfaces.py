import socket

import numpy as np
import pytest

from aae_ray.data.surfaces import (
    DEFECT_KINDS,
    MASK_THRESHOLD,
    SURFACES,
    cut_crops,
    draw_defect,
    load_photo,
    row_ranges,
    surface_arrays,
)

SMALL = {"n_train": 30, "n_test_normal": 8, "n_test_defect": 12}


@pytest.fixture(scope="module")
def sets():
    return {s: surface_arrays(s, **SMALL) for s in SURFACES}


def test_photos_load_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_photo.cache_clear()
    for surface in SURFACES:
        photo = load_photo(surface)
        assert photo.dtype == np.uint8 and photo.shape == (512, 512)
        assert photo.std() > 20  # a textured photograph, not a blank or a placeholder
        assert not photo.flags.writeable
    with pytest.raises(ValueError, match="unknown surface"):
        load_photo("marble")


def test_shapes_dtypes_and_labels(sets):
    for s, d in sets.items():
        n_test = SMALL["n_test_normal"] + SMALL["n_test_defect"]
        assert d.surface == s
        assert d.X_train.shape == (SMALL["n_train"], 1, 32, 32) and d.X_train.dtype == np.float32
        assert d.X_test.shape == (n_test, 1, 32, 32) and d.X_test.dtype == np.float32
        assert d.mask_test.shape == (n_test, 32, 32) and d.mask_test.dtype == np.float32
        assert d.y_test.dtype == np.int8 and d.y_test.tolist() == [0] * 8 + [1] * 12
        assert 0 <= d.X_train.min() and d.X_train.max() <= 1 and 0 <= d.X_test.min() and d.X_test.max() <= 1
        assert set(np.unique(d.mask_test)) <= {0.0, 1.0}
        assert d.kind_test.tolist() == ["normal"] * 8 + [DEFECT_KINDS[i % 4] for i in range(12)]


def test_train_and_test_crops_share_no_photo_row(sets):
    train_rows, test_rows = row_ranges(512, 64)
    assert train_rows[1] + 64 <= test_rows[0]
    for d in sets.values():
        assert (d.origin_train[:, 0] + d.crop <= test_rows[0]).all()
        assert (d.origin_test[:, 0] >= test_rows[0]).all()
        assert (d.origin_test[:, 0] + d.crop <= 512).all() and (d.origin_test[:, 1] + d.crop <= 512).all()


def test_masks_and_where_defects_changed_pixels(sets):
    for s, d in sets.items():
        clean = cut_crops(load_photo(s), d.origin_test, d.crop, 32)
        np.testing.assert_array_equal(d.X_train, cut_crops(load_photo(s), d.origin_train, d.crop, 32))
        normal = d.y_test == 0
        np.testing.assert_array_equal(d.X_test[normal], clean[normal])
        assert not d.mask_test[normal].any()
        for x, c, m in zip(d.X_test[~normal, 0], clean[~normal, 0], d.mask_test[~normal], strict=True):
            inside = m == 1
            assert inside.sum() >= 3
            assert inside.mean() < 0.10  # a small local defect
            np.testing.assert_array_equal(x[~inside], c[~inside])
            assert (np.abs(x - c)[inside] > MASK_THRESHOLD).all()


def test_deterministic_per_seed():
    a, b = surface_arrays("gravel", seed=3, **SMALL), surface_arrays("gravel", seed=3, **SMALL)
    c = surface_arrays("gravel", seed=4, **SMALL)
    for field in ("X_train", "X_test", "mask_test", "origin_train", "origin_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(getattr(a, field), getattr(c, field))
    # Separate streams: more train crops leave the test set as it was.
    more = surface_arrays("gravel", seed=3, n_train=50, n_test_normal=8, n_test_defect=12)
    np.testing.assert_array_equal(a.X_test, more.X_test)


def _crop(seed: int = 0) -> np.ndarray:
    photo = load_photo("brick")
    return cut_crops(photo, np.array([[380, 100 + seed]]), 64, 32)[0, 0]


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_is_visible_local_and_scaled_to_contrast(kind):
    img = _crop()
    sigma = float(img.std())
    low = (0.5 + 0.5 * (img - img.mean())).astype(np.float32)  # the same texture at half the contrast
    changes = {}
    for name, base in (("full", img), ("half", low)):
        rng = np.random.default_rng(7)
        out, mask = draw_defect(base, rng, kind)
        inside = mask == 1
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert 3 <= inside.sum() < 0.1 * img.size
        np.testing.assert_array_equal(out[~inside], base[~inside])
        changes[name] = float(np.abs(out - base).max())
    # A few standard deviations of the crop: visible, not a jump to black or white.
    assert 1.0 * sigma < changes["full"] < 6.0 * sigma
    assert changes["half"] == pytest.approx(changes["full"] / 2, rel=0.25)


def test_draw_defect_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown defect kind"):
        draw_defect(_crop(), np.random.default_rng(0), "dent")
    with pytest.raises(ValueError, match="square"):
        draw_defect(np.zeros((8, 9)), np.random.default_rng(0), "spot")

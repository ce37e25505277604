import numpy as np
import pytest
from scipy import ndimage

from aae_ray.localization import aupro, pixel_auroc, pro_curve


def _slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The definition, one threshold at a time: every distinct value, rule map >= t, 8-connected regions."""
    regions = []
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m > 0.5, structure=np.ones((3, 3)))
        regions += [(i, labels == j) for j in range(1, n + 1)]
    normal = masks < 0.5
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        points.append((above[normal].mean(), np.mean([above[i][r].mean() for i, r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1, x1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0), fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _random_case(seed: int, n: int = 6, side: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.normal(size=(n, side, side)), sigma=(0, 1.5, 1.5))
    masks = (blobs > 0.25).astype(np.float32)
    masks[0] = 0  # one defect-free image: its pixels count as normal
    maps = 0.8 * masks + rng.normal(size=masks.shape)
    return masks, maps


def test_pixel_auroc_perfect_random_and_empty():
    masks, _ = _random_case(0)
    assert pixel_auroc(masks, masks) == 1.0
    assert pixel_auroc(masks, 1 - masks) == 0.0
    big = np.random.default_rng(1).random((20, 32, 32)) < 0.1
    assert pixel_auroc(big, np.random.default_rng(2).random(big.shape)) == pytest.approx(0.5, abs=0.03)
    assert np.isnan(pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(3).random((2, 4, 4))))


def test_aupro_perfect_and_inverted():
    masks, _ = _random_case(0)
    assert aupro(masks, masks) == pytest.approx(1.0)
    assert aupro(masks, 1 - masks) == pytest.approx(0.0)
    assert np.isnan(aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))


def test_aupro_random_map_is_half_the_limit():
    rng = np.random.default_rng(4)
    masks = np.zeros((50, 16, 16))
    masks[:, 4:8, 4:8] = 1
    masks[:, 10:13, 9:15] = 1
    for limit in (0.3, 1.0):
        assert aupro(masks, rng.random(masks.shape), fpr_limit=limit) == pytest.approx(limit / 2, abs=0.02)


def _two_regions(missed_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Two images, one region each: the first region's map is 1 (found), the second's `missed_value`; normals 0."""
    masks = np.zeros((2, 6, 6))
    masks[0, 1:3, 1:3] = 1
    masks[1, 3:6, 2:4] = 1
    maps = np.zeros_like(masks)
    maps[0][masks[0] == 1] = 1
    maps[1][masks[1] == 1] = missed_value
    return masks, maps


def test_hand_computed_two_regions_one_found():
    masks, maps = _two_regions(missed_value=-1.0)  # below every normal pixel: found only at FPR 1
    fpr, pro, thresholds = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 1, 0, -1])
    assert aupro(masks, maps) == pytest.approx(0.5)
    # Tied with the normals at 0: the curve goes straight from (0, 0.5) to (1, 1), so at FPR 0.3 it is at 0.65.
    masks, maps = _two_regions(missed_value=0.0)
    assert aupro(masks, maps) == pytest.approx((0.5 + 0.65) / 2)


def test_regions_are_eight_connected_and_weighted_alike():
    masks = np.zeros((1, 8, 8))
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # one diagonal region of two pixels
    masks[0, 6, 6] = 1  # a second region of one pixel
    maps = np.zeros_like(masks)
    maps[0, 1, 1] = maps[0, 6, 6] = 1  # half of the first region, all of the second
    fpr, pro, _ = pro_curve(masks, maps)
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(0.75))  # 4-connected it would be (1 + 0 + 1) / 3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, decimals, limit):
    masks, maps = _random_case(seed)
    if decimals is not None:
        maps = np.round(maps, decimals)  # many ties, within regions and between regions and normals
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(_slow_aupro(masks, maps, limit), abs=1e-12)


def test_quantile_thresholds_approximate_the_exact_curve():
    masks, maps = _random_case(5, n=40, side=24)
    exact = aupro(masks, maps)
    assert 0.2 < exact < 0.9  # a case where the curve matters, not a trivial 0 or 1
    assert aupro(masks, maps, n_thresholds=300) == pytest.approx(exact, abs=0.01)
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(exact, abs=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.ones((1, 2, 2)), np.full((1, 2, 2), np.nan))

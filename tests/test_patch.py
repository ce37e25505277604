"""The patch family: Hotelling's T2 of raw k x k pixel patches, no network. The yardstick of every benchmark."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sklearn.covariance import LedoitWolf

from aae_ray import artifacts, serving
from aae_ray.detector import Detector
from aae_ray.scoring import auroc


def patch_config(**overrides):
    return tiny_config(family="patch", **overrides)


@pytest.fixture(scope="module")
def patch_fit(solder) -> Detector:
    return Detector(patch_config()).fit(solder.normals)


def test_patch_fits_without_training_and_scores_by_its_local_t2(patch_fit, solder):
    assert patch_fit.history_ == [] and patch_fit.primary_ == "local"
    s = patch_fit.score(solder.X[::9])
    np.testing.assert_array_equal(s.score, s.t2_local)
    assert s.codes.shape == (len(s.score), 16)  # the 4 x 4 averaged image: its global code


def test_patch_t2_is_the_mahalanobis_distance_of_each_patch(patch_fit, solder):
    """By hand: the 8 x 8 patch at row 2, column 6 (stride 2: pixel rows 4-11, columns 12-19), scikit-learn's
    Ledoit-Wolf fit of that position on the training normals; the image score is the largest position's."""
    rng = np.random.default_rng(0)
    train = solder.normals[rng.permutation(len(solder.normals))[round(0.2 * len(solder.normals)):]]
    lw = LedoitWolf().fit(train[:, 0, 4:12, 12:20].reshape(len(train), -1))
    X = solder.X[solder.truth == 1][:5]
    d = X[:, 0, 4:12, 12:20].reshape(5, -1).astype(np.float64) - lw.location_
    local = patch_fit.model_.patches(torch.from_numpy(X)).numpy()
    t2 = patch_fit.local_.t2_map(local)
    assert t2.shape == (5, 13, 13)
    np.testing.assert_allclose(t2[:, 2, 6], np.einsum("ni,ij,nj->n", d, lw.precision_, d), rtol=1e-5)
    np.testing.assert_allclose(patch_fit.score(X).t2_local, t2.reshape(5, -1).max(1), rtol=1e-12)


def test_patch_separates_defects_from_normals(patch_fit, solder):
    """Measured 0.96 on these 102 test joints (the raw patch baseline of issue 14: 0.95-0.99)."""
    X, y = solder.test
    assert auroc(y, patch_fit.score_samples(X)) >= 0.9


def test_patch_heat_map_peaks_at_a_planted_bright_square(patch_fit, solder):
    X = solder.normals[:3].copy()
    X[:, 0, 20:24, 6:10] = 1.0  # a 4 x 4 saturated particle at rows 20-23, columns 6-9
    amap = patch_fit.anomaly_map(X)
    assert amap.shape == (3, 32, 32)
    for a in amap:
        i, j = np.unravel_index(a.argmax(), a.shape)
        assert 16 <= i <= 27 and 2 <= j <= 13  # within a patch of the square


def test_shared_statistics_fit_one_gaussian_for_every_position(solder):
    det = Detector(patch_config(local_stats="shared", patch_size=4, patch_stride=4)).fit(solder.normals[:200])
    assert det.local_.mean.shape == (1, 16) and det.local_.shape == (8, 8)


def test_nearest_statistics_keep_a_bank_of_normals_and_round_trip_with_identical_scores(solder, tmp_path):
    det = Detector(patch_config(local_stats="nearest", local_bank=50, local_reach=1)).fit(solder.normals)
    assert det.local_.bank.shape == (50, 64, 13, 13)  # 8x8 patches every 2 pixels of 32: 13 x 13 positions
    back = artifacts.load(artifacts.save(det, tmp_path / "m", {"round": 0}))
    a, b = det.score(solder.X[:30]), back.score(solder.X[:30])
    for field in ("score", "t2_local", "p_value", "maps"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_nearest_patches_separate_the_small_defects_better_than_one_gaussian_a_position(solder):
    X, y = solder.test
    got = {stats: auroc(y, Detector(patch_config(local_stats=stats)).fit(solder.normals).score_samples(X))
           for stats in ("per_position", "nearest")}
    assert got["nearest"] > got["per_position"] + 0.01, got


def test_the_nearest_bank_takes_known_normals_first_and_tops_up_with_presumed_ones(solder):
    """A defect hidden among the presumed normals must not become some defect's nearest normal: with enough known
    normals the bank holds no presumed image; with too few it holds every known one, then presumed ones."""
    normals, defects = solder.normals, solder.X[solder.fit_mask & (solder.truth == 1)]
    X = np.concatenate([normals, defects])
    presumed = np.r_[np.zeros(len(normals), bool), np.ones(len(defects), bool)]
    presumed[:40] = True  # some normals are presumed too
    for bank_size, known_in_bank in ((50, 50), (len(normals), len(normals) - 40)):
        cfg = patch_config(local_stats="nearest", local_bank=bank_size, calibration_fraction=0, t2_trim=0)
        det = Detector(cfg).fit(X, known=~presumed)
        patches = det.model_.patches(torch.from_numpy(X)).numpy()
        rows = {r.tobytes(): i for i, r in enumerate(patches)}
        in_bank = np.array([rows[b.tobytes()] for b in det.local_.bank])
        assert len(in_bank) == bank_size and len(set(in_bank)) == bank_size
        assert (~presumed[in_bank]).sum() == known_in_bank, bank_size


def test_the_combined_scales_come_from_the_known_normals_not_a_defect_hidden_among_the_presumed(solder):
    """Defects planted among the presumed normals (y = 0, not known) would set the local score's scale."""
    normals, defects = solder.normals, solder.X[solder.fit_mask & (solder.truth == 1)]
    X = np.concatenate([normals, defects])
    known = np.r_[np.ones(len(normals), bool), np.zeros(len(defects), bool)]
    det = Detector(patch_config(score="combined", calibration_fraction=0, t2_trim=0)).fit(X, known=known)
    local = det.score(X, maps=False).t2_local
    assert det.scales_["local"] == pytest.approx(np.quantile(local[known], 0.99))
    assert det.scales_["local"] < np.quantile(local, 0.99)


def test_patch_artifact_round_trips_with_identical_scores(patch_fit, solder, tmp_path):
    artifacts.save(patch_fit, tmp_path / "m", {"round": 0})
    back = artifacts.load(tmp_path / "m")
    a, b = patch_fit.score(solder.X[:30]), back.score(solder.X[:30])
    for field in ("score", "t2", "t2_local", "p_value", "anomaly", "recon_error", "maps", "x_hat"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_a_patch_artifact_with_damaged_local_statistics_is_refused(patch_fit, tmp_path):
    folder = artifacts.save(patch_fit, tmp_path / "m", {"round": 0})
    (folder / "local.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(artifacts.ArtifactError, match="not local T2 statistics"):
        artifacts.load(folder)


def test_patch_is_servable_with_its_heat_map(patch_fit, solder):
    got = serving.score_images(patch_fit, solder.X[:2], [True, False])
    assert got[0]["t2_local"] == pytest.approx(got[0]["score"]) and "heatmap" in got[0] and "heatmap" not in got[1]


def test_a_patch_larger_than_the_image_is_a_config_error():
    from aae_ray.config import ConfigError, validate

    with pytest.raises(ConfigError, match="patch_size=40 is larger than input_size=32"):
        validate({"family": "patch", "patch_size": 40})


def planted(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Synthetic images: grey 0.5 + a per-image brightness (sd 0.02) + pixel noise (sd 0.1). A "local" anomaly
    adds a bright 2 x 2 spot (+0.6): plain in its 8 x 8 patches (T2 +144 against a max of ~100 over the normal
    patches), lost in the 4 x 4 cell averages of the global code (+9 against chi2(16)'s 99% point 32). A "global"
    anomaly tilts the image (+0.05 left half, -0.05 right): +256 in the global code, about +16 in any patch."""
    X = 0.5 + rng.normal(0, 0.02, (n, 1, 1, 1)) + rng.normal(0, 0.1, (n, 1, 32, 32))
    if kind == "local":
        for x, (i, j) in zip(X, rng.integers(4, 26, (n, 2)), strict=True):
            x[0, i : i + 2, j : j + 2] += 0.6
    elif kind == "global":
        X[..., :16] += 0.05
        X[..., 16:] -= 0.05
    return np.clip(X, 0, 1).astype(np.float32)


def test_the_combined_score_catches_what_each_single_score_misses():
    rng = np.random.default_rng(0)
    train = planted(rng, 700, "normal")
    local, glob, normal = planted(rng, 100, "local"), planted(rng, 100, "global"), planted(rng, 200, "normal")
    flagged = {}
    for score in ("global", "local", "combined"):
        det = Detector(patch_config(score=score, calibration_fraction=0.3)).fit(train)
        assert det.limit_.method == "calibrated"
        flagged[score] = {name: float(det.predict(X).mean()) for name, X in
                          (("local", local), ("global", glob), ("normal", normal))}
    assert flagged["global"]["local"] < 0.3 and flagged["global"]["global"] > 0.9
    assert flagged["local"]["global"] < 0.3 and flagged["local"]["local"] > 0.9
    assert flagged["combined"]["local"] > 0.9 and flagged["combined"]["global"] > 0.9
    assert flagged["combined"]["normal"] < 0.05

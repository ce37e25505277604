"""Hotelling's T2, its Phase-II control limit, conformal calibration and the detection metrics (pure numpy)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from aae_ray.scoring import (
    Hotelling,
    LocalHotelling,
    LocalNearest,
    ScoreLimit,
    auprc,
    auroc,
    f_ucl,
    ledoit_wolf,
    precision_at_k,
    rates_at,
    summary,
)

P5_COV = np.array(  # a fixed, clearly non-spherical 5x5 covariance (eigenvalues 0.5 .. 6.3)
    [[4.0, 1.2, 0.5, 0.0, 0.3],
     [1.2, 2.0, 0.4, 0.2, 0.0],
     [0.5, 0.4, 1.0, 0.1, 0.0],
     [0.0, 0.2, 0.1, 0.8, 0.2],
     [0.3, 0.0, 0.0, 0.2, 3.0]]
)


def gaussian(rng: np.random.Generator, n: int, cov: np.ndarray = P5_COV) -> np.ndarray:
    return rng.multivariate_normal(np.arange(len(cov), dtype=float), cov, size=n)


def multivariate_t(rng: np.random.Generator, n: int, p: int = 5, dof: int = 3) -> np.ndarray:
    """Heavy-tailed codes: a Gaussian divided by sqrt(chi2_dof / dof), so the F limit's assumption fails."""
    return rng.normal(size=(n, p)) / np.sqrt(rng.chisquare(dof, size=(n, 1)) / dof)


# --- T2 itself -----------------------------------------------------------------------------------------------


def test_t2_is_the_quadratic_form_of_the_precision():
    """d = z - mean = (1, 2); d^T P d = 2*1 + 2*0.5*1*2 + 1*4 = 8, by hand."""
    hot = Hotelling(mean=np.array([1.0, 2.0]), precision=np.array([[2.0, 0.5], [0.5, 1.0]]), n=100, p=2,
                    alpha=0.01, threshold=10.0, shrinkage=0.0)
    np.testing.assert_allclose(hot.t2(np.array([[2.0, 4.0], [1.0, 2.0], [0.0, 0.0]])), [8.0, 0.0, 2 + 2 + 4])


def test_fit_centres_on_the_sample_mean():
    z = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    hot = Hotelling.fit(z)
    np.testing.assert_array_equal(hot.mean, [1.0, 1.0])
    assert hot.t2(hot.mean[None])[0] == 0.0


def test_trimmed_fit_ignores_defects_hidden_among_the_normals():
    """10% of the presumed normals are defects far out along one axis: the plain fit's mean and variance are
    pulled towards them, the trimmed fit stays with the normals, and the defects score higher under it."""
    rng = np.random.default_rng(0)
    normals = rng.standard_normal((1800, 4))
    hidden = rng.standard_normal((200, 4)) + [6.0, 0, 0, 0]
    z = np.concatenate([normals, hidden])
    plain, trimmed = Hotelling.fit(z), Hotelling.fit(z, trim=0.15)
    assert abs(plain.mean[0]) > 0.4
    assert abs(trimmed.mean[0]) < 0.15
    assert np.median(trimmed.t2(hidden)) > 2 * np.median(plain.t2(hidden))


@pytest.mark.parametrize("trim", [-0.1, 0.5])
def test_trim_outside_zero_to_half_is_rejected(trim):
    with pytest.raises(ValueError, match="trim"):
        Hotelling.fit(np.random.default_rng(0).standard_normal((50, 2)), trim=trim)


def test_ledoit_wolf_shrinkage_on_a_hand_case():
    """Points (+-1, 0), (0, +-2): S = diag(0.5, 2), target 1.25 I, d2 = 1.125, b2 = 17/16,
    so shrinkage = 17/18 and the covariance is 17/18 * 1.25 I + 1/18 * S."""
    z = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    cov, shrink = ledoit_wolf(z)
    assert shrink == pytest.approx(17 / 18)
    np.testing.assert_allclose(cov, 17 / 18 * 1.25 * np.eye(2) + 1 / 18 * np.diag([0.5, 2.0]))


def test_with_many_samples_t2_is_the_mahalanobis_distance_under_the_sample_covariance():
    """Shrinkage vanishes as n grows, so T2 must match the textbook formula with the sample covariance."""
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([1.0, -2.0], [[4.0, 1.2], [1.2, 1.0]], size=100_000)
    hot = Hotelling.fit(z)
    assert hot.shrinkage < 1e-3
    q = np.array([[3.0, 0.0], [-1.0, -5.0], [0.0, 0.0]])
    d = q - z.mean(0)
    expected = np.einsum("ni,ij,nj->n", d, np.linalg.inv(np.cov(z.T)), d)
    np.testing.assert_allclose(hot.t2(q), expected, rtol=1e-3)


def test_precision_is_symmetric():
    hot = Hotelling.fit(gaussian(np.random.default_rng(1), 300))
    np.testing.assert_array_equal(hot.precision, hot.precision.T)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda z: np.column_stack([z, np.full(len(z), 5.0)]), id="constant-dimension"),
        pytest.param(lambda z: np.column_stack([z, z[:, 1]]), id="duplicated-dimension"),
        pytest.param(lambda z: np.ones_like(z), id="all-codes-identical"),
    ],
)
def test_singular_covariance_still_gives_finite_t2(make):
    z = make(np.random.default_rng(2).normal(size=(500, 3)))
    hot = Hotelling.fit(z)
    probe = np.vstack([z[:5], z[:5] + 1.0])  # including points off the degenerate direction
    t2 = hot.t2(probe)
    assert np.isfinite(hot.precision).all()
    assert np.isfinite(t2).all() and (t2 >= 0).all()
    assert np.isfinite(hot.p_value(t2)).all()


@pytest.mark.parametrize("bad", [np.full((50, 3), np.nan), np.zeros(50), np.array([[1.0, np.inf]] * 50)])
def test_fit_rejects_non_finite_or_non_matrix_codes(bad):
    with pytest.raises(ValueError, match="finite codes of shape"):
        Hotelling.fit(bad)


# --- the F limit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p", "alpha"), [(100, 2, 0.01), (2000, 16, 0.05), (30, 12, 0.001), (8, 6, 0.1)])
def test_f_ucl_is_the_phase_two_formula(n, p, alpha):
    expected = p * (n + 1) * (n - 1) / (n * (n - p)) * stats.f.ppf(1 - alpha, p, n - p)
    assert f_ucl(n, p, alpha) == pytest.approx(expected, rel=1e-12)


def test_f_ucl_grows_as_alpha_shrinks():
    assert f_ucl(200, 8, 0.05) < f_ucl(200, 8, 0.01) < f_ucl(200, 8, 0.001)


@pytest.mark.parametrize(("n", "p"), [(6, 5), (5, 5), (3, 5)])
def test_f_ucl_needs_more_samples_than_dimensions_plus_one(n, p):
    with pytest.raises(ValueError, match=f"n={n}, p={p}"):
        f_ucl(n, p, 0.01)


def test_fit_with_too_few_codes_raises():
    with pytest.raises(ValueError, match="more fitting samples"):
        Hotelling.fit(np.random.default_rng(0).normal(size=(6, 5)))


def test_fitted_threshold_is_the_f_limit():
    hot = Hotelling.fit(gaussian(np.random.default_rng(3), 400), alpha=0.05)
    assert hot.threshold == hot.ucl_f == pytest.approx(f_ucl(400, 5, 0.05))
    lim = ScoreLimit.f_limit(hot)
    assert (lim.method, lim.threshold) == ("f_ucl", hot.threshold)


# --- on Gaussian codes the F limit is exact -------------------------------------------------------------------


def test_f_limit_false_alarm_rate_on_gaussian_codes():
    """Fit on 2,000 draws of N(mu, Sigma), p = 5; 20,000 new draws exceed the limit at about alpha = 0.01.
    Over 30 seeds the rate ranged 0.0080-0.0113; the binomial sd of 20,000 draws alone is 0.0007."""
    rng = np.random.default_rng(0)
    hot = Hotelling.fit(gaussian(rng, 2000), alpha=0.01)
    t2 = hot.t2(gaussian(rng, 20_000))
    assert 0.006 <= float(np.mean(t2 > hot.threshold)) <= 0.014


def test_f_p_values_of_new_gaussian_codes_are_uniform():
    """Uniform marginally over fits, so pool 200 fits (n = 2,000 each) x 100 new draws. One fit with 20,000
    draws is the wrong check: given one fitted covariance, a KS test at that size rejects 20% of the time
    even with the exact sample covariance (measured over 40 fits) -- that is estimation error, not a bug."""
    rng = np.random.default_rng(0)
    p_values = []
    for _ in range(200):
        hot = Hotelling.fit(gaussian(rng, 2000))
        p_values.append(hot.p_value(hot.t2(gaussian(rng, 100))))
    pv = np.concatenate(p_values)
    assert ((pv > 0) & (pv <= 1)).all()
    assert stats.kstest(pv, "uniform").pvalue > 0.001
    deciles = np.histogram(pv, bins=10, range=(0, 1))[0]
    np.testing.assert_allclose(deciles, 2000, rtol=0.1)  # measured at most 5.6% off over 10 seeds


def test_f_p_value_equals_alpha_at_the_limit():
    hot = Hotelling.fit(gaussian(np.random.default_rng(4), 500), alpha=0.02)
    assert hot.p_value(np.array([hot.threshold]))[0] == pytest.approx(0.02, rel=1e-9)


# --- conformal calibration: the one limit type (ScoreLimit) ---------------------------------------------------


def calibrated(hot: Hotelling, z_heldout: np.ndarray, z_train: np.ndarray | None = None) -> ScoreLimit:
    train = hot.t2(z_heldout if z_train is None else z_train)
    return ScoreLimit.fit(train, hot.t2(z_heldout), hot.alpha)


def test_f_limit_over_alarms_on_heavy_tailed_codes():
    """The premise of calibration: multivariate t (3 dof) codes break the Gaussian F limit (measured 2.7-6.4%
    false alarms for alpha = 1% over 30 seeds)."""
    rng = np.random.default_rng(0)
    hot = Hotelling.fit(multivariate_t(rng, 2000), alpha=0.01)
    assert float(np.mean(hot.t2(multivariate_t(rng, 20_000)) > hot.threshold)) > 0.02


def test_calibrated_threshold_holds_alpha_on_heavy_tailed_codes():
    """Conformal: given m held-out normals the held-out false-alarm rate is about alpha whatever the
    distribution. With m = 5,000 its sd is ~0.0014, and 20,000 test draws add ~0.0007 (measured 0.0066-0.0125
    over 30 seeds)."""
    rng = np.random.default_rng(0)
    hot = Hotelling.fit(multivariate_t(rng, 2000), alpha=0.01)
    lim = calibrated(hot, multivariate_t(rng, 5000))
    assert lim.method == "calibrated"
    assert lim.threshold > hot.ucl_f  # heavy tails need a higher limit than the F distribution's
    t2 = hot.t2(multivariate_t(rng, 20_000))
    assert 0.006 <= float(np.mean(t2 > lim.threshold)) <= 0.014


def test_calibrated_threshold_is_the_conformal_rank():
    """ceil((1 - 0.01) * (199 + 1)) = 198: the 198th smallest of 199 held-out T2 values."""
    rng = np.random.default_rng(5)
    hot = Hotelling.fit(rng.normal(size=(300, 3)))
    held = rng.normal(size=(199, 3))
    assert calibrated(hot, held).threshold == np.sort(hot.t2(held))[197]


def test_too_few_held_out_normals_fall_back_to_the_training_quantile():
    """With alpha = 0.01 the rank ceil(0.99 (m + 1)) exceeds m until m = 99."""
    rng = np.random.default_rng(6)
    hot = Hotelling.fit(rng.normal(size=(300, 3)), alpha=0.01)
    train = rng.normal(size=(300, 3))
    assert calibrated(hot, rng.normal(size=(98, 3)), train).method == "train_quantile"
    assert calibrated(hot, rng.normal(size=(99, 3)), train).method == "calibrated"
    assert ScoreLimit.fit(np.arange(10.0), None, 0.01).method == "train_max"


def test_conformal_p_values_on_a_hand_case():
    """p = (1 + #{calibration scores >= s}) / (m + 1) with calibration scores 1, 2, 3, 4."""
    lim = ScoreLimit(0.2, 4.0, np.array([1.0, 2.0, 3.0, 4.0]), "calibrated")
    np.testing.assert_allclose(lim.p_value(np.array([0.0, 2.0, 2.5, 4.0, 100.0])), [1.0, 0.8, 0.6, 0.4, 0.2])


def test_conformal_p_values_lie_in_zero_one():
    rng = np.random.default_rng(7)
    hot = Hotelling.fit(multivariate_t(rng, 500))
    lim = calibrated(hot, multivariate_t(rng, 300))
    pv = lim.p_value(hot.t2(np.vstack([multivariate_t(rng, 1000), np.full((3, 5), 1e6), hot.mean[None]])))
    assert ((pv > 0) & (pv <= 1)).all()
    assert pv.min() == pytest.approx(1 / 301) and pv.max() == 1.0


@pytest.mark.parametrize("method", ["f_ucl", "calibrated"])
def test_flagged_exactly_when_p_value_is_at_most_alpha(method):
    """The threshold and the p-values are one decision: score > threshold <=> p <= alpha."""
    rng = np.random.default_rng(8)
    hot = Hotelling.fit(multivariate_t(rng, 1000), alpha=0.05)
    lim = ScoreLimit.f_limit(hot) if method == "f_ucl" else calibrated(hot, multivariate_t(rng, 400))
    t2 = hot.t2(multivariate_t(rng, 5000))
    flagged = t2 > lim.threshold
    assert 0 < flagged.sum() < len(t2)
    np.testing.assert_array_equal(flagged, lim.p_value(t2) <= 0.05)


def test_hotelling_round_trips_through_json():
    rng = np.random.default_rng(9)
    hot = Hotelling.fit(rng.normal(size=(300, 4)), alpha=0.05)
    back = Hotelling.from_dict(json.loads(json.dumps(hot.to_dict(), allow_nan=False)))
    z = rng.normal(size=(50, 4)) * 3
    np.testing.assert_array_equal(back.t2(z), hot.t2(z))
    np.testing.assert_array_equal(back.p_value(back.t2(z)), hot.p_value(hot.t2(z)))
    assert (back.threshold, back.n, back.p, back.alpha) == (hot.threshold, hot.n, hot.p, hot.alpha)


@pytest.mark.parametrize("method", ["f_ucl", "calibrated"])
def test_score_limit_round_trips_through_json(method):
    rng = np.random.default_rng(9)
    hot = Hotelling.fit(rng.normal(size=(300, 4)), alpha=0.05)
    lim = ScoreLimit.f_limit(hot) if method == "f_ucl" else calibrated(hot, rng.normal(size=(100, 4))).with_f(hot)
    d = json.loads(json.dumps(lim.to_dict(), allow_nan=False))
    assert d["threshold_basis"] == method and d["n_calibration"] == len(lim.calibration)
    back = ScoreLimit.from_dict(d)
    t2 = hot.t2(rng.normal(size=(50, 4)) * 3)
    np.testing.assert_array_equal(back.p_value(t2), lim.p_value(t2))
    assert (back.threshold, back.method, back.ucl_f) == (lim.threshold, lim.method, lim.ucl_f)


# --- local T2: Hotelling's T2 at every position of a feature map -------------------------------------------


def test_local_t2_peaks_where_a_planted_outlier_is():
    """Gaussian feature maps, one position of one image pushed 8 sd out: its map's maximum is at that
    position, per position and shared alike, and each position's T2 equals a hand-computed Mahalanobis
    distance with scikit-learn's Ledoit-Wolf fit of that position."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(10)
    train = rng.normal(size=(400, 3, 5, 5))
    test = rng.normal(size=(20, 3, 5, 5))
    test[7, :, 3, 1] += 8.0
    for per_position in (True, False):
        loc = LocalHotelling.fit(train, per_position=per_position)
        t2 = loc.t2_map(test)
        assert t2.shape == (20, 5, 5)
        assert np.unravel_index(t2[7].argmax(), (5, 5)) == (3, 1)
        assert loc.image_score(t2).argmax() == 7
    lw = LedoitWolf().fit(train[:, :, 2, 4])
    d = test[:, :, 2, 4] - lw.location_
    np.testing.assert_allclose(LocalHotelling.fit(train, per_position=True).t2_map(test)[:, 2, 4],
                               np.einsum("ni,ij,nj->n", d, lw.precision_, d), rtol=1e-5)


def test_local_image_score_is_the_max_or_the_top_k_mean():
    loc = LocalHotelling(np.zeros((1, 1)), np.eye(1)[None], (2, 2), topk=1)
    maps = np.array([[[1.0, 5.0], [3.0, 2.0]]])
    assert loc.image_score(maps)[0] == 5.0
    assert LocalHotelling(loc.mean, loc.precision, (2, 2), topk=2).image_score(maps)[0] == 4.0


def test_local_t2_refuses_a_map_of_another_shape():
    loc = LocalHotelling.fit(np.random.default_rng(0).normal(size=(50, 2, 3, 3)), per_position=True)
    with pytest.raises(ValueError, match="does not match"):
        loc.t2_map(np.zeros((2, 2, 4, 4)))


def test_nearest_is_the_squared_distance_to_the_closest_bank_code_within_reach():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(30, 4, 6, 6))
    query = bank[[5]].copy()
    query[0, :, 2, 2] += np.array([3.0, 0.0, 0.0, 0.0])
    want = ((bank[:, :, 1:4, 1:4] - query[0, :, 2, 2][None, :, None, None]) ** 2).sum(1).min()
    got = LocalNearest.fit(bank, reach=1).t2_map(query)
    np.testing.assert_allclose(got[0, 2, 2], want, rtol=1e-4)
    assert got[0, 0, 0] == pytest.approx(0.0, abs=1e-4)  # image 5 itself is in the bank


def test_nearest_forgives_a_part_that_moved_within_its_reach_and_not_beyond():
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(20, 3, 8, 8))
    moved = np.roll(bank[[0]], shift=1, axis=3)  # every code one cell to the right
    for reach, forgiven in ((0, False), (1, True)):
        t2 = LocalNearest.fit(bank, reach=reach).t2_map(moved)[0, :, 1:]  # column 0 wrapped round
        assert bool(t2.max() < 1e-3) == forgiven


def test_nearest_leaves_an_image_out_of_its_own_search():
    bank = np.random.default_rng(5).normal(size=(10, 2, 3, 3))
    loc = LocalNearest.fit(bank, reach=0)
    own = loc.t2_map(bank, own=np.arange(10))
    others = np.stack([LocalNearest.fit(np.delete(bank, i, 0), reach=0).t2_map(bank[[i]])[0] for i in range(10)])
    np.testing.assert_allclose(own, others, rtol=1e-4, atol=1e-5)
    assert loc.t2_map(bank).max() < 1e-4 < own.min()


def test_nearest_refuses_a_map_of_another_shape():
    loc = LocalNearest.fit(np.zeros((4, 2, 3, 3)), reach=1)
    with pytest.raises(ValueError, match="does not match"):
        loc.t2_map(np.zeros((2, 2, 4, 4)))


# --- metrics (1 = defect; a higher score is more abnormal) ----------------------------------------------------


def test_auroc_hand_case():
    """Pairs (defect, normal): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4."""
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_auroc_counts_ties_as_half():
    assert auroc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5
    assert auroc([0, 1], [0.3, 0.3]) == 0.5
    assert auroc([0, 0, 1], [0.1, 0.5, 0.5]) == 0.75


def test_auroc_perfect_and_inverted_separation():
    y = [0, 0, 0, 1, 1]
    assert auroc(y, [1, 2, 3, 4, 5]) == 1.0
    assert auroc(y, [5, 4, 3, 2, 1]) == 0.0


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1]])
def test_metrics_are_nan_without_both_classes(y):
    assert math.isnan(auroc(y, [0.1, 0.2, 0.3]))


def test_an_infinite_score_ranks_as_the_most_abnormal():
    """An overflowing T2 is still an order: the metrics must not refuse it."""
    assert auroc([0, 1, 0, 1], [1.0, np.inf, -np.inf, 3.0]) == 1.0
    assert auroc([1, 0], [np.inf, np.inf]) == 0.5
    assert auprc([0, 1, 1], [2.0, np.inf, 5.0]) == 1.0


def test_auprc_hand_case():
    """Ranked: defect, normal, defect, normal -> precision 1/1 and 2/3 at the defects; mean 5/6."""
    assert auprc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert auprc([0, 1, 1], [0.1, 0.9, 0.8]) == 1.0
    assert math.isnan(auprc([0, 0], [0.1, 0.2]))


def test_precision_at_k():
    y, score = [1, 0, 1, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.1]
    assert precision_at_k(y, score, 1) == 1.0
    assert precision_at_k(y, score, 2) == 0.5
    assert precision_at_k(y, score, 3) == pytest.approx(2 / 3)
    assert precision_at_k(y, score, 50) == pytest.approx(2 / 5)  # k beyond N means all
    assert math.isnan(precision_at_k(y, score, 0))


def test_rates_at_flags_scores_strictly_above_the_threshold():
    y, score = [1, 1, 0, 0, 0, 1], [5.0, 2.0, 2.0, 1.0, 3.0, 0.5]
    assert rates_at(y, score, 2.0) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert rates_at(y, score, 10.0) == (0.0, 0.0)
    tpr, fpr = rates_at([0, 0], [1.0, 2.0], 1.5)
    assert math.isnan(tpr) and fpr == 0.5


def test_summary_collects_the_metrics():
    s = summary([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.3, k=2)
    assert s == {"auroc": 0.75, "auprc": pytest.approx((1 + 2 / 3) / 2), "precision@2": 0.5, "tpr": 1.0,
                 "fpr": 0.5}


@pytest.mark.parametrize(("y", "score"), [([0, 1, 2], [1, 2, 3]), ([0, 1], [1, 2, 3])])
def test_metrics_reject_bad_labels(y, score):
    with pytest.raises(ValueError, match="0/1"):
        auroc(y, score)


def test_the_bootstrap_auroc_difference_equals_sklearns_on_every_resample():
    from sklearn.metrics import roc_auc_score

    from aae_ray.scoring import _paired_auroc_diff

    rng = np.random.default_rng(4)
    y = (rng.random((30, 40)) < 0.25).astype(int)
    y[0] = 0  # a resample without defects counts as no difference
    a = np.round(rng.normal(size=(30, 40)) + y, 1)  # rounded: ties, which count half
    b = rng.normal(size=(30, 40)) + 0.5 * y
    got = _paired_auroc_diff(y, a, b)
    want = [roc_auc_score(yy, aa) - roc_auc_score(yy, bb) if 0 < yy.sum() < len(yy) else 0.0
            for yy, aa, bb in zip(y, a, b, strict=True)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] == 0.0

"""The Detector contract (PyOD's shape, scikit-learn's rules) and what training must achieve on solder joints."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from aae_ray.detector import Detector, Scores
from aae_ray.scoring import auroc, f_ucl
from aae_ray.train import build_model, mix_defects

# --- the contract --------------------------------------------------------------------------------------------


def test_init_only_stores_the_config():
    cfg = tiny_config()
    det = Detector(cfg)
    assert det.config is cfg
    assert not [name for name in vars(det) if name.endswith("_")]


def test_fit_returns_self_and_sets_the_fitted_attributes(solder):
    det = Detector(tiny_config(epochs=1))
    assert det.fit(solder.normals[:120]) is det
    assert {"model_", "history_", "hotelling_", "threshold_", "n_train_", "n_defects_mixed_"} <= set(vars(det))
    assert len(det.history_) == 1


def test_threshold_is_set_and_finite(fitted):
    assert np.isfinite(fitted.threshold_) and fitted.threshold_ > 0
    assert fitted.threshold_ == fitted.hotelling_.threshold


def test_output_shapes(fitted, solder):
    X = solder.X[:7]
    assert fitted.encode(X).shape == (7, 16)
    assert fitted.score_samples(X).shape == (7,)
    assert fitted.reconstruct(X).shape == (7, 1, 32, 32)
    assert fitted.anomaly_map(X).shape == (7, 32, 32)
    assert fitted.reconstruction_error(X).shape == (7,)
    pred = fitted.predict(X)
    assert pred.shape == (7,) and pred.dtype == np.int8 and set(pred.tolist()) <= {0, 1}


def test_score_agrees_with_the_single_purpose_methods(fitted, solder):
    X = solder.X[::5]
    s = fitted.score(X)
    assert isinstance(s, Scores)
    assert all(a.shape == (len(X),) for a in (s.t2, s.p_value, s.anomaly, s.recon_error))
    np.testing.assert_allclose(s.t2, fitted.score_samples(X), rtol=1e-6)
    np.testing.assert_array_equal(s.anomaly, s.t2 > fitted.threshold_)
    np.testing.assert_allclose(s.recon_error, fitted.reconstruction_error(X), rtol=1e-5)
    np.testing.assert_allclose(s.p_value, fitted.hotelling_.p_value(s.t2))
    assert ((s.p_value > 0) & (s.p_value <= 1)).all()


def test_anomaly_map_is_the_per_pixel_squared_error(fitted, solder):
    X = solder.X[:3]
    np.testing.assert_allclose(fitted.anomaly_map(X), ((fitted.reconstruct(X) - X) ** 2)[:, 0], rtol=1e-6)


def test_predict_flags_what_is_above_the_threshold(fitted, solder):
    t2 = fitted.score_samples(solder.X)
    np.testing.assert_array_equal(fitted.predict(solder.X), (t2 > fitted.threshold_).astype(np.int8))


def test_scores_do_not_depend_on_the_batch(fitted, solder):
    """Inference is in eval mode: an image's T2 is the same alone or in a batch."""
    X = solder.X[:20]
    np.testing.assert_allclose(fitted.score_samples(X[3:4]), fitted.score_samples(X)[3:4], rtol=1e-5)


@pytest.mark.parametrize(
    "shape", [(4, 32, 32), (4, 3, 32, 32), (4, 1, 64, 64), (4, 1, 32, 31), (32, 32), (4, 1, 1, 32, 32)]
)
def test_bad_input_shapes_raise_value_error(fitted, shape):
    X = np.zeros(shape, dtype=np.float32)
    for method in (fitted.score_samples, fitted.predict, fitted.score, fitted.encode, fitted.anomaly_map):
        with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 32, 32\)"):
            method(X)
    with pytest.raises(ValueError, match="expected images of shape"):
        Detector(tiny_config()).fit(X)


def test_fit_rejects_labels_that_do_not_match_the_images(solder):
    with pytest.raises(ValueError, match="one label per image"):
        Detector(tiny_config()).fit(solder.normals[:100], np.zeros(99))


def test_fit_needs_more_normals_than_latent_dim_plus_one(solder):
    with pytest.raises(ValueError, match="need more than latent_dim \\+ 1 = 9 normal training images"):
        Detector(tiny_config(calibration_fraction=0.0)).fit(solder.normals[:9])


@pytest.mark.xfail(strict=True, reason="BUG: Detector._run returns np.empty((0,)) for no images, so encode gives "
                   "shape (0,) instead of (0, latent_dim) and score() raises IndexError (detector.py, _run)")
def test_an_empty_batch_scores_to_empty_results(fitted):
    X = np.empty((0, 1, 32, 32), dtype=np.float32)
    assert fitted.encode(X).shape == (0, 16)
    assert fitted.score_samples(X).shape == (0,)
    assert fitted.score(X).t2.shape == (0,)


@pytest.mark.xfail(strict=True, reason="BUG: Detector.fit builds the model before fit_model seeds torch, so the "
                   "initial weights come from the global RNG and the same config gives a different model "
                   "(detector.py fit: build_model(cfg) runs before torch.manual_seed(cfg.seed) in train.fit_model)")
def test_same_config_and_data_give_the_same_model(solder):
    X = solder.normals[:150]
    a = Detector(tiny_config(epochs=1)).fit(X).score_samples(X)
    b = Detector(tiny_config(epochs=1)).fit(X).score_samples(X)
    np.testing.assert_array_equal(a, b)


# --- threshold: calibrated on held-out normals, or the F limit ---------------------------------------------


def test_calibration_normals_are_held_out_of_training(solder):
    det = Detector(tiny_config(epochs=1, calibration_fraction=0.3)).fit(solder.normals)
    assert det.n_train_ == len(solder.normals) - round(0.3 * len(solder.normals)) == 238


def test_threshold_is_calibrated_when_enough_normals_are_held_out(solder):
    """0.3 of 340 normals = 102 held out, enough for the conformal rank at alpha = 0.01 (needs 99)."""
    det = Detector(tiny_config(epochs=1, calibration_fraction=0.3)).fit(solder.normals)
    assert det.hotelling_.method == "calibrated"
    assert len(det.hotelling_.calibration) == 102


def test_too_few_held_out_normals_fall_back_to_the_f_limit(fitted):
    """The default 0.1 of 340 = 34 held-out normals cannot support the alpha = 0.01 rank."""
    assert fitted.hotelling_.method == "f_ucl"
    assert fitted.threshold_ == pytest.approx(f_ucl(fitted.n_train_, 16, 0.01))


def test_f_ucl_setting_ignores_held_out_normals(solder):
    det = Detector(tiny_config(epochs=1, calibration_fraction=0.3, threshold="f_ucl")).fit(solder.normals)
    assert det.hotelling_.method == "f_ucl"
    assert det.threshold_ == pytest.approx(f_ucl(238, 8, 0.01))


def test_confirmed_defects_are_mixed_in_at_the_anomaly_ratio(solder):
    X = solder.X[solder.fit_mask]
    y = solder.truth[solder.fit_mask]  # 340 normals, 78 defects
    det = Detector(tiny_config(epochs=1, anomaly_ratio=0.05)).fit(X, y)
    assert det.n_train_ == 340 - 34
    assert det.n_defects_mixed_ == len(mix_defects(306, 78, 0.05, np.random.default_rng(0))) == 16


# --- what training achieves ---------------------------------------------------------------------------------


def test_t2_separates_defects_from_normals(fitted, solder):
    """5 epochs of the tiny AAE: T2 AUROC on the 102 test joints (42 defects) measured 0.69-0.82 over 8 seeds."""
    X, y = solder.test
    assert auroc(y, fitted.score_samples(X)) >= 0.65


def _gaussian_kl(z: np.ndarray) -> float:
    """KL(N(mean, cov) || N(0, I)) of the codes' first two moments: 0 exactly when they match the prior."""
    mu, cov = z.mean(0), np.cov(z.T)
    return 0.5 * float(np.trace(cov) + mu @ mu - len(mu) - np.linalg.slogdet(cov)[1])


def test_aae_training_moves_the_latent_towards_the_prior(solder):
    """10 epochs on 340 normal joints at least halve the codes' KL to N(0, I) from the untrained encoder's
    near-point mass (measured over 6 seeds: ratio 0.34-0.47, KL ~18-25 from ~50). A weak check: at this budget
    the AAE is no closer to N(0, I) than the plain AE (ratio 0.33-0.39), and a fresh discriminator still tells
    its codes from prior samples with ~99% accuracy (see test_models for the adversarial steps on their own)."""
    cfg = tiny_config(epochs=10, seed=0)
    torch.manual_seed(0)
    untrained = Detector(cfg)
    untrained.model_ = build_model(cfg).eval()
    before = _gaussian_kl(untrained.encode(solder.normals))
    after = _gaussian_kl(Detector(cfg).fit(solder.normals).encode(solder.normals))
    assert after < 0.65 * before


def test_push_loss_puts_training_defects_above_the_normals(solder):
    """defect_loss "push" drives confirmed defects away from the prior's centre: their mean T2 ends above the
    normals' (measured 1.7-3.8x over 8 seeds, 10 epochs, push_weight 10). Whether push separates them better
    than plain mixing is not stable at this budget (better in 6 of those 8 seeds), so it is not asserted."""
    X, y = solder.X[solder.fit_mask], solder.truth[solder.fit_mask]
    cfg = tiny_config(latent_dim=16, epochs=10, anomaly_ratio=0.05, defect_loss="push", push_weight=10.0)
    det = Detector(cfg).fit(X, y)
    assert det.n_defects_mixed_ > 0
    assert {"rec", "push", "disc", "gen"} <= set(det.history_[-1].losses)
    t2 = det.score_samples(X)
    assert t2[y == 1].mean() > 1.3 * t2[y == 0].mean()

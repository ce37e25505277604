"""t2_trim: auto: the share of defects hidden among presumed normals, estimated from known normals (where the
cut lies) and confirmed defects (how many pass it), sets how much of the training codes T2's fit leaves out."""

import numpy as np
from conftest import tiny_config

from aae_ray import artifacts
from aae_ray.detector import Detector
from aae_ray.scoring import MIN_KNOWN_FOR_SHARE, estimate_contamination

rng = np.random.default_rng(0)
KNOWN = rng.normal(0, 1, 2000)
POOL = np.concatenate([rng.normal(0, 1, 1800), rng.normal(2.5, 1, 200)])  # 10% hidden defects
DEFECTS = rng.normal(2.5, 1, 300)


def test_the_estimate_recovers_the_hidden_share_when_confirmed_defects_look_like_the_hidden_ones():
    c = estimate_contamination(POOL, KNOWN, DEFECTS)
    assert abs(c.share - 0.10) < 0.03
    assert c.n_defects == 300 and "300 confirmed defects" in c.describe()


def test_without_confirmed_defects_it_is_a_lower_bound():
    bound = estimate_contamination(POOL, KNOWN, np.empty(0))
    assert bound.defect_pass == 1.0 and 0 < bound.share < estimate_contamination(POOL, KNOWN, DEFECTS).share
    assert "lower bound" in bound.describe()


def test_a_clean_pool_is_estimated_clean_and_no_pool_or_too_few_known_normals_give_zero():
    assert estimate_contamination(rng.normal(0, 1, 2000), KNOWN, DEFECTS).share < 0.02
    assert estimate_contamination(np.empty(0), KNOWN, DEFECTS).share == 0.0
    few = estimate_contamination(POOL, KNOWN[: MIN_KNOWN_FOR_SHARE - 1], DEFECTS)
    assert few.share == 0.0 and "fewer than" in few.describe()


def test_auto_trims_a_pool_that_hides_defects_and_leaves_known_clean_data_alone(solder, tmp_path):
    normals, defects = solder.normals, solder.X[solder.fit_mask & (solder.truth == 1)]
    pool = np.concatenate([normals[:240], defects[:30]])  # presumed normal, 30 of 270 hidden defects
    X = np.concatenate([pool, defects[30:60]])  # 30 confirmed defects
    y = np.r_[np.zeros(len(pool)), np.ones(30)].astype(np.int8)
    cfg = tiny_config(epochs=3, t2_trim="auto")
    det = Detector(cfg).fit(X, y, known=np.zeros(len(X), dtype=bool), X_calibration=normals[240:])
    assert det.contamination_.share > 0.03 and det.t2_trim_ > 0
    # the same network and normals, every one vouched for: nothing hides, nothing is trimmed
    clean = det.rescored(normals[:240], known=np.ones(240, dtype=bool))
    assert clean.contamination_.share == 0.0 and clean.t2_trim_ == 0.0
    assert clean.model_ is det.model_
    # a fixed trim is taken as given
    assert det.rescored(X, y, known=np.zeros(len(X), dtype=bool), t2_trim=0.2).t2_trim_ == 0.2
    loaded = artifacts.load(artifacts.save(det, tmp_path / "m", {}))
    assert loaded.t2_trim_ == det.t2_trim_
    np.testing.assert_allclose(loaded.score_samples(X[:20]), det.score_samples(X[:20]), rtol=1e-6)

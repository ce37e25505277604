"""The control charts' formulas against hand-computed cases and the published run lengths."""

import numpy as np
import pytest
from scipy import stats

from aae_ray import control_chart as cc

# Lucas & Saccucci (1990), as tabulated in Montgomery, Introduction to Statistical Quality Control, Table 9.11:
# two-sided EWMA, asymptotic limits, zero-state ARL at a mean shift of delta standard deviations.
PUBLISHED = {  # (lam, L): {delta: ARL}
    (0.05, 2.615): {0.0: 500, 0.25: 84.1, 0.5: 28.8, 0.75: 16.4, 1.0: 11.4, 1.5: 7.1, 2.0: 5.2, 3.0: 3.5},
    (0.10, 2.814): {0.0: 500, 0.25: 106, 0.5: 31.3, 0.75: 15.9, 1.0: 10.3, 1.5: 6.1, 2.0: 4.4, 3.0: 2.9},
    (0.20, 2.962): {0.0: 500, 0.25: 150, 0.5: 41.8, 0.75: 18.2, 1.0: 10.5, 1.5: 5.5, 2.0: 3.7, 3.0: 2.4},
    (0.50, 3.071): {0.0: 500, 0.25: 255, 0.5: 88.8, 0.75: 35.9, 1.0: 17.5, 1.5: 6.4},
}


@pytest.mark.parametrize("design", list(PUBLISHED))
def test_markov_chain_arls_match_the_published_tables(design):
    lam, L = design
    for delta, published in PUBLISHED[design].items():
        assert cc.ewma_arl(lam, L, delta) == pytest.approx(published, rel=0.02), (lam, L, delta)


def test_the_sas_documented_example_to_five_digits():
    # SAS/QC's EWMAARL(1.00, 0.25, 3.0) "returns an average run length of 11.154267016" (Crowder's method).
    assert cc.ewma_arl(0.25, 3.0, 1.0, states=801) == pytest.approx(11.154267016, rel=2e-6)


def test_lam_one_is_the_shewhart_chart_whose_arl_is_known_in_closed_form():
    # Z_t = z_t: an alarm each step with probability P(|z + delta| > 3).
    for delta in (0.0, 1.0, 2.0):
        p = stats.norm.sf(3 - delta) + stats.norm.cdf(-3 - delta)
        assert cc.ewma_arl(1.0, 3.0, delta) == pytest.approx(1 / p, rel=1e-3)


def test_design_finds_the_published_limit_for_arl0_500():
    d = cc.design_ewma(0.1, 500)
    assert d.L == pytest.approx(2.814, abs=0.003)
    assert d.arl(0) == pytest.approx(500, rel=1e-4)
    assert d.limit == pytest.approx(d.L * np.sqrt(0.1 / 1.9))
    with pytest.raises(ValueError, match="in-control ARL"):
        cc.design_ewma(0.1, 1)
    with pytest.raises(ValueError, match="0 < lam <= 1"):
        cc.ewma_arl(0.0, 3.0)


def test_simulated_run_lengths_match_the_design_in_control_and_shifted():
    d = cc.design_ewma(0.1, 200)
    in_control = cc.simulate_run_lengths(d, 0.0, runs=4000, seed=1)
    shifted = cc.simulate_run_lengths(d, 1.0, runs=4000, seed=2)
    # Run lengths are roughly geometric (sd ~ mean): 4000 runs put the mean within ~5% at three standard errors.
    assert in_control.mean() == pytest.approx(200, rel=0.06)
    assert shifted.mean() == pytest.approx(d.arl(1.0), rel=0.05)
    assert shifted.mean() < in_control.mean() / 10


def test_ewma_follows_its_recursion():
    z = np.array([1.0, -2.0, 0.5, 3.0])
    lam, Z, expect = 0.3, 0.0, []
    for x in z:
        Z = lam * x + (1 - lam) * Z
        expect.append(Z)
    np.testing.assert_allclose(cc.ewma(z, lam), expect)
    np.testing.assert_allclose(cc.ewma(z[2:], lam, start=expect[1]), expect[2:])
    assert cc.ewma(np.array([]), lam).shape == (0,)


def test_an_excursion_raises_one_alarm_and_the_chart_rearms_back_near_the_centre():
    limit = 0.6
    stat = np.array([0.1, 0.7, 0.5, 0.8, 0.4, 0.2, 0.9, 0.0, -0.9, -0.7])
    # 0.7 alarms; 0.8 after a dip to 0.5 (not under 0.3) does not; 0.2 re-arms; 0.9 alarms; 0.0; -0.9 alarms
    np.testing.assert_array_equal(cc.excursions(stat, limit), [1, 6, 8])
    np.testing.assert_array_equal(cc.excursions(stat, limit, rearm=1.0), [1, 3, 6, 8])
    np.testing.assert_array_equal(cc.excursions(np.array([0.9, 0.9]), limit), [0])
    assert cc.excursions(np.array([]), limit).shape == (0,)


def test_a_chart_cut_anywhere_and_continued_raises_the_same_excursions():
    """What a check that goes on from the last one relies on: the alarms of the pieces, each started with the
    armed state the piece before it ended in, are the alarms of the whole."""
    rng = np.random.default_rng(5)
    stat = cc.ewma(rng.standard_normal(400) + np.repeat(rng.choice([0.0, 1.5, -1.5], 20), 20), 0.2)
    limit = 0.6
    whole = cc.excursions(stat, limit)
    assert len(whole) >= 4
    for cuts in [(k,) for k in range(0, 401, 7)] + [tuple(sorted(rng.choice(400, 3, replace=False)))
                                                      for _ in range(40)]:
        got, armed, a = [], True, 0
        for b in [*cuts, 400]:
            got += list(cc.excursions(stat[a:b], limit, armed=armed) + a)
            armed = cc.armed_after(stat[a:b], limit, armed=armed)
            a = b
        assert got == list(whole), cuts


def test_normal_scores_are_standard_whatever_the_scores_law():
    rng = np.random.default_rng(0)
    cal = rng.chisquare(4, 199)  # skewed, like a T2
    z = cc.normal_scores(np.sort(cal)[[0, 99, 198]] + 1e-9, cal)
    # one above the 1st, the 100th and the 199th calibration score: mid-ranks 1, 100, 199 of 0..199
    np.testing.assert_allclose(z, stats.norm.ppf((np.array([1, 100, 199]) + 0.5) / 200) / cc.rank_sd(199))
    # Every rank equally likely (an in-control image): mean 0 and variance 1 exactly.
    support = cc.normal_scores(np.concatenate([[-1.0], np.sort(cal) + 1e-9]), cal)
    assert support.mean() == pytest.approx(0, abs=1e-12)
    assert support.var() == pytest.approx(1, abs=1e-12)
    # And on new draws from the same law, close to N(0, 1).
    new = cc.normal_scores(rng.chisquare(4, 20000), cal)
    assert abs(new.mean()) < 0.15 and abs(new.std() - 1) < 0.1
    with pytest.raises(ValueError, match="calibration"):
        cc.normal_scores(np.ones(3), np.array([]))


def test_f_normal_scores_invert_the_p_value():
    np.testing.assert_allclose(cc.f_normal_scores(np.array([0.5, 0.025, 0.00135])), [0, 1.96, 3.0], atol=2e-3)
    assert np.isfinite(cc.f_normal_scores(np.array([0.0]))).all()


def test_rate_band_is_the_binomial_interval():
    band = cc.rate_band(1000, 25, 0.01)
    assert (band.low, band.high) == tuple(int(v) for v in stats.binom.interval(0.99, 1000, 0.01))
    assert band.expected == pytest.approx(10) and band.outside
    assert not cc.rate_band(1000, 12, 0.01).outside
    assert cc.rate_band(0, 0, 0.01).high == 0

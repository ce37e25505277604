"""The control charts of the line (aae_ray.monitor draws them): pure functions, numpy and scipy only.

The score chart is the Shewhart chart every quality engineer knows: each served image's primary score against the
calibrated limit, which a normal image exceeds with probability alpha. It catches a bad part, not a slow drift of
the process (a lamp dimming, a lens fouling): a shift of one standard deviation moves a 1%-limit chart's alarm
rate from 1% to about 4%, lost in the noise for hundreds of parts. The EWMA chart (Roberts 1959) is made for
that: it averages the stream with weight `lam` on the newest point and signals when the average leaves
+-L sigma_EWMA.

Both need a stream that is normal with mean 0 and variance 1 while the process is in control; a T2 score is not
(it is skewed, and its law depends on the family). `normal_scores` makes it so without assuming a law: an image's
rank among the calibration normals (the same scores its threshold and p-value came from) is uniform over 0..m
for an in-control image, so the normal quantile of its mid-rank, divided by the exact standard deviation of those
m + 1 values, has mean 0 and variance 1 whatever the score's distribution. A shift of 1 on that scale is what the
charts' run lengths are quoted for.

Limits are designed for an in-control average run length (ARL0: images between false alarms) by the Markov
chain of Brook & Evans (1972) as used by Lucas & Saccucci (1990), whose tables the tests reproduce. Written
here because no kept library designs EWMA limits: river's and scikit-multiflow's drift detectors (ADWIN,
Page-Hinkley, KSWIN) take thresholds with no stated false-alarm rate, which is the one number an engineer
asks of an alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

STATES = 201  # Markov chain states across the in-control band: ARLs to 0.1% of the published tables


@dataclass(frozen=True)
class EwmaDesign:
    """An EWMA chart on a standardized stream: Z_t = lam * z_t + (1 - lam) * Z_{t-1}, Z_0 = 0, alarm when
    |Z_t| > L * sqrt(lam / (2 - lam)) (the asymptotic limits, as in the published tables)."""

    lam: float
    L: float
    arl0: float  # the in-control ARL the design was made for (or computed for a given L)

    @property
    def limit(self) -> float:
        return self.L * float(np.sqrt(self.lam / (2.0 - self.lam)))

    def arl(self, shift: float = 0.0) -> float:
        """The zero-state average run length when the stream's mean has moved by `shift` standard deviations."""
        return ewma_arl(self.lam, self.L, shift)

    def to_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "L": self.L, "arl0": self.arl0, "limit": self.limit}


def ewma_arl(lam: float, L: float, shift: float = 0.0, states: int = STATES) -> float:
    """Zero-state ARL of a two-sided EWMA chart on N(shift, 1) observations (Lucas & Saccucci 1990): the band
    (-h, h) is cut into `states` cells, P[i, j] is the chance that one step moves the statistic from the centre
    of cell i into cell j, and the ARLs from every cell solve (I - P) arl = 1."""
    if not 0.0 < lam <= 1.0 or L <= 0:
        raise ValueError(f"an EWMA needs 0 < lam <= 1 and L > 0, got lam={lam}, L={L}")
    h = L * np.sqrt(lam / (2.0 - lam))
    w = 2.0 * h / states
    centres = -h + w * (np.arange(states) + 0.5)
    # From centre c_i the next value (1 - lam) c_i + lam x lands in cell j when x is in an interval of width w/lam.
    lo = (centres[None, :] - w / 2 - (1.0 - lam) * centres[:, None]) / lam - shift
    P = stats.norm.cdf(lo + w / lam) - stats.norm.cdf(lo)
    arl = np.linalg.solve(np.eye(states) - P, np.ones(states))
    return float(arl[states // 2])


def design_ewma(lam: float = 0.1, arl0: float = 500.0) -> EwmaDesign:
    """The EWMA whose in-control ARL is `arl0` (L found by root finding on `ewma_arl`)."""
    if arl0 < 2:
        raise ValueError(f"the in-control ARL must be >= 2 images, got {arl0}")
    L = optimize.brentq(lambda x: np.log(ewma_arl(lam, x)) - np.log(arl0), 0.5, 6.0, xtol=1e-6)
    return EwmaDesign(float(lam), float(L), float(arl0))


def ewma(z: np.ndarray, lam: float, start: float = 0.0) -> np.ndarray:
    """The EWMA statistic of a stream, Z_t for t = 1..n, from Z_0 = `start`. scipy's lfilter runs the recursion
    Z_t = lam z_t + (1 - lam) Z_{t-1} in C (a Python loop costs a second per million served images)."""
    from scipy.signal import lfilter

    z = np.asarray(z, dtype=np.float64)
    if not len(z):
        return z
    out, _ = lfilter([lam], [1.0, -(1.0 - lam)], z, zi=[(1.0 - lam) * start])
    return out


def excursions(stat: np.ndarray, limit: float, rearm: float = 0.5, armed: bool = True) -> np.ndarray:
    """Indices where the statistic leaves (-limit, limit) while the chart is armed: one alarm a drift episode. After
    an alarm the chart re-arms once |stat| is back under `rearm * limit`, so a sustained shift, which keeps the
    EWMA near its limit, raises one event, not one each time noise carries it back and forth across the limit.
    `armed`: whether the chart is armed before the first value (False: a stream continued after an alarm)."""
    stat = np.abs(np.asarray(stat, dtype=np.float64))
    out, calm = np.flatnonzero(stat > limit), np.flatnonzero(stat < rearm * limit)
    alarms = []
    i = 0 if armed else (int(np.searchsorted(out, calm[0])) if len(calm) else len(out))
    while i < len(out):  # one step an alarm: the scan jumps from an alarm to the next re-arming, then onwards
        alarms.append(out[i])
        j = np.searchsorted(calm, out[i])
        if j == len(calm):
            break
        i = np.searchsorted(out, calm[j])
    return np.asarray(alarms, dtype=np.int64)


def armed_after(stat: np.ndarray, limit: float, rearm: float = 0.5, armed: bool = True) -> bool:
    """Whether the chart of `excursions` is armed after the last value: no alarm yet unrearmed."""
    alarms = excursions(stat, limit, rearm, armed)
    since = int(alarms[-1]) + 1 if len(alarms) else (None if armed else 0)
    return since is None or bool((np.abs(np.asarray(stat, dtype=np.float64)[since:]) < rearm * limit).any())


def normal_scores(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Scores -> a stream that is N(0, 1)-like (mean 0, variance 1 exactly) for in-control images: the normal
    quantile of each score's mid-rank among the m sorted calibration scores, over the standard deviation of the
    m + 1 values it can take. Needs calibration scores (the limit's `calibration`); an F-law limit has none and
    uses `f_normal_scores`."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    m = len(cal)
    if m < 1:
        raise ValueError("normal scores need the calibration scores of the limit")
    s = np.asarray(scores, dtype=np.float64)
    rank = (np.searchsorted(cal, s, side="left") + np.searchsorted(cal, s, side="right")) / 2.0  # ties: mid-rank
    return stats.norm.ppf((rank + 0.5) / (m + 1.0)) / rank_sd(m)


def rank_sd(m: int) -> float:
    """The standard deviation of norm.ppf((k + 0.5) / (m + 1)) over k = 0..m (equally likely): a little under 1."""
    q = stats.norm.ppf((np.arange(m + 1) + 0.5) / (m + 1.0))
    return float(np.sqrt(np.mean(q**2)))


def f_normal_scores(p_values: np.ndarray) -> np.ndarray:
    """Exact p-values (the F law of the global T2) -> N(0, 1) while in control: the upper normal quantile."""
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    return stats.norm.isf(p)


def simulate_run_lengths(design: EwmaDesign, shift: float = 0.0, runs: int = 2000, seed: int = 0,
                         max_len: int = 100_000, draw=None) -> np.ndarray:
    """Run lengths of the chart on simulated streams, all `runs` at once: images until the first alarm (capped at
    `max_len`). `draw(rng, shape)` gives the in-control stream (standard normal by default); `shift` is added."""
    rng = np.random.default_rng(seed)
    draw = draw or (lambda r, shape: r.standard_normal(shape))
    Z = np.zeros(runs)
    length = np.full(runs, max_len, dtype=np.int64)
    alive = np.ones(runs, dtype=bool)
    t, block = 0, 256
    while alive.any() and t < max_len:
        x = draw(rng, (block, int(alive.sum()))) + shift
        idx = np.flatnonzero(alive)
        for k in range(block):  # steps in Python, runs in numpy: 2,000 runs x 500 steps ~ 10 ms
            Z[idx] = design.lam * x[k] + (1.0 - design.lam) * Z[idx]
            hit = np.abs(Z[idx]) > design.limit
            if hit.any():
                length[idx[hit]] = t + k + 1
                alive[idx[hit]] = False
                keep = ~hit
                idx, x = idx[keep], x[:, keep]
            if not len(idx):
                break
        t += block
    return length


@dataclass(frozen=True)
class RateBand:
    """Points over the limit in one period against what alpha allows: the binomial interval of n * alpha."""

    n: int
    over: int
    expected: float
    low: int
    high: int

    @property
    def outside(self) -> bool:
        return self.over > self.high or self.over < self.low


def rate_band(n: int, over: int, alpha: float, level: float = 0.99) -> RateBand:
    """The count of images over an alpha limit among n in-control ones is Binomial(n, alpha): its central
    `level` interval is the band an hour's count should fall in."""
    low, high = stats.binom.interval(level, n, alpha) if n else (0.0, 0.0)
    return RateBand(int(n), int(over), n * alpha, int(low), int(high))

"""Hotelling's T2 on latent codes, its Phase-II control limit, and the detection metrics.

Pure numpy/scipy: no torch, so Serve and the UI can score codes without the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import stats

TRIM_ROUNDS = 3  # refits after trimming; the kept set barely changes after the second


def ledoit_wolf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Covariance shrunk towards a scaled identity (Ledoit & Wolf 2004), so it is never singular.

    Returns (covariance, shrinkage in [0, 1])."""
    n, p = z.shape
    zc = z - z.mean(0)
    s = zc.T @ zc / n  # (p, p) maximum-likelihood covariance
    mu = np.trace(s) / p
    target = mu * np.eye(p)
    d2 = np.sum((s - target) ** 2)
    b2 = _b2(zc, s)
    shrink = float(min(1.0, b2 / d2)) if d2 > 0 else 1.0
    cov = shrink * target + (1 - shrink) * s
    if mu == 0:  # every code identical: fall back to the identity so T2 stays defined
        cov = np.eye(p)
    return cov, shrink


def _b2(zc: np.ndarray, s: np.ndarray) -> float:
    """How noisy s is as an estimate: the spread of the per-sample outer products around it.
    Chunked so n * p * p floats never sit in memory at once."""
    chunk = max(1, 2_000_000 // s.size)
    total = 0.0
    for i in range(0, len(zc), chunk):
        part = zc[i : i + chunk]
        total += float(np.sum((np.einsum("ni,nj->nij", part, part) - s) ** 2))
    return total / len(zc) ** 2


def f_ucl(n: int, p: int, alpha: float) -> float:
    """Phase-II upper control limit for one new observation: p(n+1)(n-1)/(n(n-p)) F_{1-alpha}(p, n-p)."""
    if n <= p + 1:
        raise ValueError(f"T2 needs more fitting samples than latent dimensions + 1 (n={n}, p={p})")
    return p * (n + 1) * (n - 1) / (n * (n - p)) * float(stats.f.ppf(1 - alpha, p, n - p))


@dataclass(frozen=True)
class Hotelling:
    """Fitted T2 statistics.

    `threshold` starts as the Phase-II F-distribution UCL at `alpha` (DESIGN.md). The F limit assumes
    Gaussian codes; `calibrate` replaces it (and the p-values) by the conformal quantile of T2 on normals
    the model never trained on, which holds whatever the codes' distribution (Vovk et al. 2005)."""

    mean: np.ndarray  # (p,)
    precision: np.ndarray  # (p, p) inverse of the shrunk covariance
    n: int
    p: int
    alpha: float
    threshold: float
    shrinkage: float
    ucl_f: float = float("nan")  # the F-distribution limit, kept for reporting after calibration
    calibration: np.ndarray | None = None  # sorted T2 of held-out normals, when calibrated

    @property
    def method(self) -> str:
        return "f_ucl" if self.calibration is None else "calibrated"

    @classmethod
    def fit(cls, z: np.ndarray, alpha: float = 0.01, trim: float = 0.0) -> Hotelling:
        """Mean and shrunk covariance of the codes z (n, p). With `trim` > 0 the fit is repeated without the
        `trim` share of highest-T2 codes, so defects hidden among presumed normals do not widen the normal
        region (a trimmed estimator in the spirit of MCD, Rousseeuw 1984)."""
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or not np.isfinite(z).all():
            raise ValueError(f"expected finite codes of shape (n, p), got shape {z.shape}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        hot = cls._fit(z, alpha)
        for _ in range(TRIM_ROUNDS if trim > 0 else 0):
            t2 = hot.t2(z)
            hot = cls._fit(z[t2 <= np.quantile(t2, 1 - trim)], alpha)
        return hot

    @classmethod
    def _fit(cls, z: np.ndarray, alpha: float) -> Hotelling:
        n, p = z.shape
        threshold = f_ucl(n, p, alpha)
        cov, shrink = ledoit_wolf(z)
        precision = np.linalg.inv(cov)
        return cls(z.mean(0), (precision + precision.T) / 2, n, p, alpha, threshold, shrink, threshold)

    def calibrate(self, z_heldout: np.ndarray) -> Hotelling:
        """Threshold = the ceil((1 - alpha)(m + 1))-th smallest T2 of m held-out normals, so a new normal
        exceeds it with probability <= alpha. Too few held-out normals for that rank: unchanged."""
        t2 = np.sort(self.t2(z_heldout))
        m = len(t2)
        rank = int(np.ceil((1 - self.alpha) * (m + 1)))
        if rank > m:
            return self
        return replace(self, threshold=float(t2[rank - 1]), calibration=t2)

    def t2(self, z: np.ndarray) -> np.ndarray:
        d = np.asarray(z, dtype=np.float64) - self.mean  # (N, p)
        return np.einsum("ni,ij,nj->n", d, self.precision, d)

    def p_value(self, t2: np.ndarray) -> np.ndarray:
        """P(T2 >= t2) for a new normal image: conformal when calibrated, else the Phase-II F distribution."""
        if self.calibration is not None:
            cal = self.calibration
            above = len(cal) - np.searchsorted(cal, np.asarray(t2, dtype=np.float64), side="left")
            return (1.0 + above) / (len(cal) + 1.0)
        n, p = self.n, self.p
        f = np.asarray(t2, dtype=np.float64) * n * (n - p) / (p * (n + 1) * (n - 1))
        return stats.f.sf(f, p, n - p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = self.mean.tolist()
        d["precision"] = self.precision.tolist()
        d["calibration"] = None if self.calibration is None else self.calibration.tolist()
        d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Hotelling:
        cal = d.get("calibration")
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["precision"], dtype=np.float64),
                   int(d["n"]), int(d["p"]), float(d["alpha"]), float(d["threshold"]), float(d["shrinkage"]),
                   float(d["ucl_f"]), None if cal is None else np.asarray(cal, dtype=np.float64))


@dataclass(frozen=True)
class ScoreLimit:
    """Threshold and p-values for a family's native score (reconstruction error, negative ELBO, distance to a
    centre, GAN residual), which follows no known distribution: conformal on held-out normals like
    `Hotelling.calibrate`; without enough of them, the (1 - alpha) quantile of the training normals' scores
    (PyOD's rule), which is optimistic: those images were trained on."""

    alpha: float
    threshold: float
    calibration: np.ndarray  # sorted scores of the normals the threshold came from
    method: str  # "calibrated" (held-out normals) or "train_quantile"
    ucl_f: float = float("nan")  # no F limit for a native score; kept so reports can treat both alike

    @classmethod
    def fit(cls, train_scores: np.ndarray, heldout_scores: np.ndarray | None, alpha: float) -> ScoreLimit:
        for scores, method in ((heldout_scores, "calibrated"), (train_scores, "train_quantile")):
            if scores is None:
                continue
            scores = np.sort(np.asarray(scores, dtype=np.float64))
            if not np.isfinite(scores).all():
                raise ValueError("anomaly scores of the normals are not finite")
            rank = int(np.ceil((1 - alpha) * (len(scores) + 1)))
            if rank <= len(scores):
                return cls(alpha, float(scores[rank - 1]), scores, method)
        scores = np.sort(np.asarray(train_scores, dtype=np.float64))
        return cls(alpha, float(scores[-1]), scores, "train_max")  # too few images for the rank at alpha

    def p_value(self, score: np.ndarray) -> np.ndarray:
        """P(score >= s) for a new normal image, from the normals the threshold came from."""
        cal = self.calibration
        above = len(cal) - np.searchsorted(cal, np.asarray(score, dtype=np.float64), side="left")
        return (1.0 + above) / (len(cal) + 1.0)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "threshold": self.threshold, "method": self.method,
                "calibration": self.calibration.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreLimit:
        return cls(float(d["alpha"]), float(d["threshold"]), np.asarray(d["calibration"], dtype=np.float64),
                   str(d["method"]))


# --- metrics: y is 1 = defect, 0 = normal; a higher score means more abnormal -------------------------


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0/1 and match the scores in shape")
    return y, score


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with midranks for ties); NaN without both classes."""
    y, score = _check(y, score)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision: the mean of precision at each true defect's rank."""
    y, score = _check(y, score)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits == 1].mean())


def precision_at_k(y: np.ndarray, score: np.ndarray, k: int) -> float:
    y, score = _check(y, score)
    k = min(k, len(y))
    if k <= 0:
        return float("nan")
    return float(y[np.argsort(-score, kind="stable")[:k]].mean())


def rates_at(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule score > threshold."""
    y, score = _check(y, score)
    flagged = score > threshold
    tpr = float(flagged[y == 1].mean()) if (y == 1).any() else float("nan")
    fpr = float(flagged[y == 0].mean()) if (y == 0).any() else float("nan")
    return tpr, fpr


def summary(y: np.ndarray, score: np.ndarray, threshold: float, k: int = 10) -> dict[str, float]:
    tpr, fpr = rates_at(y, score, threshold)
    return {"auroc": auroc(y, score), "auprc": auprc(y, score), f"precision@{k}": precision_at_k(y, score, k),
            "tpr": tpr, "fpr": fpr}

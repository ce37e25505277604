"""Hotelling's T2 on latent codes and on feature maps, the one limit type, and the detection metrics.

Pure numpy/scipy/scikit-learn: no torch, so Serve and the UI can score codes without the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np
from scipy import stats

TRIM_ROUNDS = 3  # refits after trimming; the kept set barely changes after the second


def ledoit_wolf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Covariance shrunk towards a scaled identity (scikit-learn's Ledoit & Wolf 2004), so it is never singular.

    Returns (covariance, shrinkage in [0, 1])."""
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    if not np.ptp(z, axis=0).any():  # every code identical: the identity keeps T2 defined (sklearn gives zeros)
        return np.eye(z.shape[1]), 1.0
    cov, shrink = sk_ledoit_wolf(z)
    return cov, float(shrink)


def f_ucl(n: int, p: int, alpha: float) -> float:
    """Phase-II upper control limit for one new observation: p(n+1)(n-1)/(n(n-p)) F_{1-alpha}(p, n-p)."""
    if n <= p + 1:
        raise ValueError(f"T2 needs more fitting samples than latent dimensions + 1 (n={n}, p={p})")
    return p * (n + 1) * (n - 1) / (n * (n - p)) * float(stats.f.ppf(1 - alpha, p, n - p))


@dataclass(frozen=True)
class Hotelling:
    """Fitted T2 statistics of one Gaussian: the mean and precision, and the Phase-II F limit at `alpha`
    (DESIGN.md), which assumes Gaussian codes. The limit a Detector flags with is a `ScoreLimit`: conformal on
    held-out normals, or this F limit where it is asked for (`ScoreLimit.f_limit`)."""

    mean: np.ndarray  # (p,)
    precision: np.ndarray  # (p, p) inverse of the shrunk covariance
    n: int
    p: int
    alpha: float
    threshold: float  # the F limit
    shrinkage: float

    @property
    def ucl_f(self) -> float:
        return self.threshold

    @classmethod
    def fit(cls, z: np.ndarray, alpha: float = 0.01, trim: float = 0.0) -> Hotelling:
        """Mean and shrunk covariance of the codes z (n, p). With `trim` > 0 the fit is repeated without the
        `trim` share of highest-T2 codes, so defects hidden among presumed normals do not widen the normal
        region (a trimmed estimator in the spirit of MCD, Rousseeuw 1984). Not scikit-learn's MinCovDet: its
        covariance is not shrunk, so it is singular when the codes are many dimensions and the images few, and its
        kept share is a breakdown point rather than the labeled or estimated defect share asked for here."""
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
        return cls(z.mean(0), (precision + precision.T) / 2, n, p, alpha, threshold, shrink)

    def t2(self, z: np.ndarray) -> np.ndarray:
        d = np.asarray(z, dtype=np.float64) - self.mean  # (N, p)
        return np.einsum("ni,ij,nj->n", d, self.precision, d)

    def p_value(self, t2: np.ndarray) -> np.ndarray:
        """P(T2 >= t2) for a new normal image under the Phase-II F distribution."""
        return f_p_value(t2, self.n, self.p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = self.mean.tolist()
        d["precision"] = self.precision.tolist()
        d["ucl_f"] = self.threshold
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Hotelling:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["precision"], dtype=np.float64),
                   int(d["n"]), int(d["p"]), float(d["alpha"]), float(d.get("ucl_f", d["threshold"])),
                   float(d["shrinkage"]))


def f_p_value(t2: np.ndarray, n: int, p: int) -> np.ndarray:
    f = np.asarray(t2, dtype=np.float64) * n * (n - p) / (p * (n + 1) * (n - 1))
    return stats.f.sf(f, p, n - p)


@dataclass(frozen=True)
class LocalHotelling:
    """Hotelling's T2 at every position of a feature map (N, d, h, w): where a defect is, not only whether.

    `per_position` fits one mean and covariance per position (aligned parts: a joint is always in the middle);
    otherwise one Gaussian is shared by all positions (textures look alike everywhere). Each covariance is
    scikit-learn's Ledoit-Wolf estimate, never singular however few images. The image's local score is the
    mean of its `topk` highest positions (1: the maximum)."""

    mean: np.ndarray  # (L, d), L = h * w per position or 1 shared
    precision: np.ndarray  # (L, d, d)
    shape: tuple[int, int]  # (h, w) of the map
    topk: int = 1

    @classmethod
    def fit(cls, features: np.ndarray, *, per_position: bool, topk: int = 1) -> LocalHotelling:
        from sklearn.covariance import LedoitWolf

        f = _positions(features)  # (L, N, d)
        L, n, d = f.shape
        if n < 2:
            raise ValueError(f"local T2 needs at least 2 normal images, got {n}")
        if not per_position:  # every position is a sample of the one texture; a few 100k of them pin d x d
            flat = f.reshape(-1, d)
            f = flat[:: max(1, len(flat) // SHARED_SAMPLES)][None]
        fits = [LedoitWolf().fit(pos) for pos in f]
        precision = np.stack([(m.precision_ + m.precision_.T) / 2 for m in fits])
        return cls(np.stack([m.location_ for m in fits]), precision, tuple(features.shape[2:]), topk)

    def t2_map(self, features: np.ndarray) -> np.ndarray:
        """(N, d, h, w) -> (N, h, w) T2 per position, in float32: scoring's hot loop, where float64 cost twice
        the time for T2 values that agree to ~1e-6 relative."""
        if features.ndim != 4 or tuple(features.shape[2:]) != self.shape or features.shape[1] != self.mean.shape[1]:
            raise ValueError(f"feature map {features.shape[1:]} does not match the fitted "
                             f"{(self.mean.shape[1], *self.shape)}")
        n = len(features)
        f = _positions(features, np.float32)
        mean, precision = self._float32
        dev = f - mean[:, None, :]  # (L, N, d)
        t2 = np.einsum("lnd,lnd->ln", dev @ precision, dev)  # a batched matmul over positions: BLAS
        return np.ascontiguousarray(t2.T).reshape(n, *self.shape).astype(np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        """What an artifact stores (local.safetensors)."""
        return {"mean": self.mean, "precision": self.precision}

    @cached_property
    def _float32(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean.astype(np.float32), self.precision.astype(np.float32)

    def image_score(self, t2_map: np.ndarray) -> np.ndarray:
        return top_k_mean(t2_map, self.topk)


def top_k_mean(t2_map: np.ndarray, k: int) -> np.ndarray:
    """(N, h, w) -> (N,): the mean of each map's k highest positions (1: the maximum)."""
    flat = t2_map.reshape(len(t2_map), -1)
    k = min(k, flat.shape[1])
    return np.sort(flat, axis=1)[:, -k:].mean(1) if k > 1 else flat.max(1)


SHARED_SAMPLES = 200_000


@dataclass(frozen=True)
class LocalNearest:
    """The local score against the nearest normal: at every position, the squared distance of the image's code
    to the closest code any bank image has there or up to `reach` cells away (config `local_stats: nearest`).

    A per-position Gaussian (LocalHotelling) is one ellipsoid per position. Where parts move a little from image
    to image, a position sees blob on some normals and background on others, and the ellipsoid grows to hold
    both, and every mix of them: a void (a bright spot inside the dark solder) or a shrunken joint then sits
    inside it. The nearest normal holds only what some normal really showed near there. On the synthetic joints
    (bench/results/local_defects.md, 3 seeds) the AAE's local image AUROC went 0.985 -> 0.997 and its AUPRO
    0.796 -> 0.830. Where anomalies are whole other objects it loses (Fashion-MNIST class 0, one probe: local
    AUROC 0.864 -> 0.816), so it is a choice (the demo's search makes it), not the default. The AAE pushes
    its local codes to N(0, I), so the plain squared distance is T2 under the prior's covariance, centred on
    the nearest normal instead of the mean; for the patch family's pixels it is the squared pixel distance.
    Nearest-neighbour search with a window of positions and a leave-own-image-out rule is what scikit-learn's
    NearestNeighbors does not offer, hence the hand-written brute force (batched matmuls: BLAS)."""

    bank: np.ndarray  # (M, d, h, w) float32: the bank images' feature maps
    reach: int = 1
    topk: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bank.shape[2:])

    def arrays(self) -> dict[str, np.ndarray]:
        """What an artifact stores (local.safetensors)."""
        return {"bank": self.bank}

    @classmethod
    def fit(cls, features: np.ndarray, *, reach: int, topk: int = 1) -> LocalNearest:
        bank = np.asarray(features, dtype=np.float32)
        if bank.ndim != 4 or len(bank) < 2 or not np.isfinite(bank).all():
            raise ValueError(f"the nearest-normal bank needs a finite feature map (M >= 2, d, h, w), got {bank.shape}")
        return cls(np.ascontiguousarray(bank), reach, topk)

    def t2_map(self, features: np.ndarray, *, own: np.ndarray | None = None) -> np.ndarray:
        """(N, d, h, w) -> (N, h, w). `own[i]`: the bank row that is image i itself (-1: none), left out of its
        search, so the bank's own images score as a new normal would (their scales and limits need that)."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 4 or f.shape[1:] != self.bank.shape[1:]:
            raise ValueError(f"feature map {f.shape[1:]} does not match the bank's {self.bank.shape[1:]}")
        n, d, h, w = f.shape
        out = np.empty((h * w, n), dtype=np.float32)
        for i in range(0, n, NEAREST_CHUNK):
            q = f[i : i + NEAREST_CHUNK].reshape(-1, d, h * w).transpose(2, 0, 1)  # (L, c, d)
            c = q.shape[1]
            # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b): the bracket is one matmul of [q, 1] with the bank's [-2 b; |b|^2]
            # (_shifted), and |q|^2 is the same for every candidate, so it is added after the minimum.
            qa = np.ones((h * w, c, d + 1), dtype=np.float32)
            qa[:, :, :d] = q
            rows = None if own is None else np.flatnonzero(own[i : i + c] >= 0)
            best = np.full((h * w, c), np.inf, dtype=np.float32)
            for b in self._shifted:
                part = qa @ b  # (L, c, M)
                if rows is not None and len(rows):
                    part[:, rows, own[i : i + c][rows]] = np.inf
                np.minimum(best, part.min(2), out=best)
            out[:, i : i + c] = best + np.einsum("lcd,lcd->lc", q, q)
        return np.maximum(out, 0).T.reshape(n, h, w).astype(np.float64)

    @cached_property
    def _shifted(self) -> list[np.ndarray]:
        """The bank laid out once for the search (scoring's hot loop): for each offset within reach, its codes
        as (L, d + 1, M), -2 b stacked over |b|^2; (2 reach + 1)^2 copies of the bank in memory."""
        m, d, h, w = self.bank.shape
        r = self.reach
        # Off-map neighbours: a code far beyond any real one, so they are never the nearest.
        padded = np.pad(self.bank, ((0, 0), (0, 0), (r, r), (r, r)), constant_values=FAR)
        out = []
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                b = padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w].reshape(m, d, h * w).transpose(2, 1, 0)
                out.append(np.ascontiguousarray(np.concatenate([-2 * b, np.einsum("ldm,ldm->lm", b, b)[:, None]], 1)))
        return out

    def image_score(self, t2_map: np.ndarray) -> np.ndarray:
        return top_k_mean(t2_map, self.topk)


FAR = 1e4  # padding code for off-map positions: its squared distance (>= 1e8 a channel) is never the nearest
NEAREST_CHUNK = 64  # images per block of the nearest search: L x 64 x M distances at a time


def _positions(features: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    f = np.asarray(features, dtype=dtype)
    if f.ndim != 4 or not np.isfinite(f).all():
        raise ValueError(f"expected a finite feature map (N, d, h, w), got shape {f.shape}")
    n, d, h, w = f.shape
    return np.ascontiguousarray(f.reshape(n, d, h * w).transpose(2, 0, 1))  # (L, N, d)


@dataclass(frozen=True)
class ScoreLimit:
    """The one threshold type: the limit and p-values of whichever score is primary (`method`, written to the
    artifact as `threshold_basis`).

    - "calibrated": conformal on m normals known to be good that the model never trained on: the threshold is
      the ceil((1 - alpha)(m + 1))-th smallest of their scores, so a new normal exceeds it with probability
      <= alpha whatever the score's distribution (Vovk et al. 2005), and p = (1 + #{cal >= s}) / (m + 1);
    - "f_ucl": the Phase-II F limit of the global T2 (`f_dof` = (n, p)), where it is asked for, or where too
      few known normals exist for that rank (m >= 99 at alpha 0.01);
    - "train_quantile": too few known normals for a score without an F law: the same rule on the training
      normals' scores, their top `trim` share left out first (they may hide defects); optimistic, since those
      images were trained on. "train_max" when even they are too few.
    `n_heldout` counts the known normals that were at hand, used or not (`n_calibration` in the artifact)."""

    alpha: float
    threshold: float
    calibration: np.ndarray  # sorted scores of the normals the threshold came from (empty for f_ucl)
    method: str
    ucl_f: float = float("nan")  # the global T2's F limit, kept for reports (NaN for other scores)
    f_dof: tuple[int, int] | None = None
    n_heldout: int = 0

    @classmethod
    def fit(cls, train_scores: np.ndarray, heldout_scores: np.ndarray | None, alpha: float,
            trim: float = 0.0) -> ScoreLimit:
        n_held = 0 if heldout_scores is None else len(heldout_scores)
        train = np.sort(np.asarray(train_scores, dtype=np.float64))
        if trim > 0 and len(train):
            train = train[: max(1, int(np.ceil((1 - trim) * len(train))))]
        for scores, method in ((heldout_scores, "calibrated"), (train, "train_quantile")):
            if scores is None or not len(scores):
                continue
            scores = np.sort(np.asarray(scores, dtype=np.float64))
            if not np.isfinite(scores).all():
                raise ValueError("anomaly scores of the normals are not finite")
            rank = int(np.ceil((1 - alpha) * (len(scores) + 1)))
            if rank <= len(scores):
                return cls(alpha, float(scores[rank - 1]), scores, method, n_heldout=n_held)
        if not len(train):
            raise ValueError("no normal images to set a limit from")
        return cls(alpha, float(train[-1]), train, "train_max", n_heldout=n_held)  # too few for the rank at alpha

    @classmethod
    def f_limit(cls, hot: Hotelling) -> ScoreLimit:
        return cls(hot.alpha, hot.threshold, np.empty(0), "f_ucl", hot.threshold, (hot.n, hot.p))

    def with_f(self, hot: Hotelling) -> ScoreLimit:
        """The same limit, reporting the global T2's F limit beside it."""
        return replace(self, ucl_f=hot.threshold)

    def p_value(self, score: np.ndarray) -> np.ndarray:
        """P(score >= s) for a new normal image, from the normals the threshold came from (or the F law)."""
        if self.f_dof is not None:
            return f_p_value(score, *self.f_dof)
        cal = self.calibration
        above = len(cal) - np.searchsorted(cal, np.asarray(score, dtype=np.float64), side="left")
        return (1.0 + above) / (len(cal) + 1.0)

    def describe(self) -> str:
        return describe_basis(self.method, self.n_heldout, self.alpha)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "threshold": self.threshold, "method": self.method,
                "threshold_basis": self.method, "n_calibration": self.n_heldout, "ucl_f": self.ucl_f,
                "f_dof": None if self.f_dof is None else list(self.f_dof), "calibration": self.calibration.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreLimit:
        ucl = d.get("ucl_f")
        dof = d.get("f_dof")
        calibration = np.asarray(d["calibration"], dtype=np.float64)
        n_held = d.get("n_calibration", len(calibration) if d["method"] == "calibrated" else 0)
        return cls(float(d["alpha"]), float(d["threshold"]), calibration, str(d["method"]),
                   float("nan") if ucl is None else float(ucl), None if dof is None else (int(dof[0]), int(dof[1])),
                   int(n_held))


CONTAMINATION_CUT = 0.1  # the cut: this upper share of the known normals' scores
MIN_KNOWN_FOR_SHARE = 50  # known normals below which the cut is too loose to estimate from
MAX_TRIM = 0.3  # what t2_trim: auto trims at most, whatever the estimate (a half-defect pool is not a model of normal)


@dataclass(frozen=True)
class Contamination:
    """How many defects hide among the presumed normals, estimated from the scores of three groups.

    Above a cut that a share q of the known normals pass, a pool of presumed normals with a share pi of
    defects has pool_above = pi * defect_pass + (1 - pi) * q, so pi = (pool_above - q) / (defect_pass - q):
    the mixture-proportion estimate of positive-unlabeled learning (Elkan and Noto 2008, with the known
    normals as the labeled class). defect_pass comes from the confirmed defects; without any it is taken as 1,
    which makes pi a lower bound. The presumed normals were trained on and score a little lower than unseen
    normals, so the estimate leans low; confirmed defects of one easy kind pass the cut more often than hidden
    defects of every kind, which leans it low too, and a hard kind leans it high. Written here because
    scikit-learn has no mixture-proportion estimator."""

    share: float  # estimated share of defects among the presumed normals, in [0, 1]
    pool_above: float  # share of presumed normals above the cut
    defect_pass: float  # share of confirmed defects above the cut (1.0 assumed without any)
    n_pool: int
    n_known: int
    n_defects: int
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return self.note
        return (f"{self.share:.1%} of the {self.n_pool} presumed normals estimated to be defects: "
                f"{self.pool_above:.1%} "
                f"pass the cut {CONTAMINATION_CUT:.0%} of the {self.n_known} known normals pass, as do "
                f"{self.defect_pass:.0%} of " + (f"the {self.n_defects} confirmed defects" if self.n_defects else
                                                 "defects (assumed: none confirmed, so a lower bound)"))


def estimate_contamination(pool: np.ndarray, known: np.ndarray, defects: np.ndarray,
                           q: float = CONTAMINATION_CUT) -> Contamination:
    """Contamination from the primary scores of presumed normals (`pool`), held-out known normals and confirmed
    defects; 0 when there is no pool or too few known normals to place the cut."""
    n = (len(pool), len(known), len(defects))
    if not len(pool):
        return Contamination(0.0, 0.0, 1.0, *n, note="no presumed normals: nothing hides defects")
    if len(known) < MIN_KNOWN_FOR_SHARE:
        return Contamination(0.0, 0.0, 1.0, *n, note=f"{len(known)} known normals held out, fewer than the "
                             f"{MIN_KNOWN_FOR_SHARE} needed to estimate the presumed normals' contamination: 0 assumed")
    cut = float(np.quantile(known, 1 - q))
    above = float(np.mean(pool > cut))
    passed = float(np.mean(defects > cut)) if len(defects) else 1.0
    share = float(np.clip((above - q) / (passed - q), 0.0, 1.0)) if passed > q else 0.0
    return Contamination(share, above, passed, *n)


def needed_for_rank(alpha: float) -> int:
    """Known normals a conformal limit at alpha needs: the smallest m with ceil((1 - alpha)(m + 1)) <= m."""
    m = 1
    while int(np.ceil((1 - alpha) * (m + 1))) > m:
        m += 1
    return m


def describe_basis(method: str, n_calibration: int, alpha: float) -> str:
    """One plain line on where a threshold came from, for fit logs, `aae-ray status` and reports."""
    need = needed_for_rank(alpha)
    if method == "calibrated":
        return f"threshold calibrated on {n_calibration} known normals the model never trained on (alpha {alpha:g})"
    short = (f"only {n_calibration} known normals for calibration, alpha {alpha:g} needs {need}; label more "
             "normals (or add val normals) and run `aae-ray recalibrate`")
    if method == "f_ucl":
        return f"threshold from the F limit of the global T² ({short})" if n_calibration < need else \
            "threshold from the F limit of the global T² (asked for: threshold f_ucl)"
    which = f"{1 - alpha:g} quantile" if method == "train_quantile" else "highest score"
    return f"threshold from the training normals' {which}, which is optimistic ({short})"


# --- metrics: y is 1 = defect, 0 = normal; a higher score means more abnormal -------------------------


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0/1 and match the scores in shape")
    return y, ranked_finite(score)


def ranked_finite(score: np.ndarray) -> np.ndarray:
    """+-inf as the largest and smallest floats: scikit-learn's metrics refuse infinities, and only the order
    of the scores matters to them (an overflowing T2 is still the most abnormal image)."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(score, nan=np.nan, posinf=big, neginf=-big)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's); NaN without both classes, where scikit-learn raises."""
    from sklearn.metrics import roc_auc_score

    y, score = _check(y, score)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (scikit-learn's: tied scores share one threshold); NaN without a defect."""
    from sklearn.metrics import average_precision_score

    y, score = _check(y, score)
    return float(average_precision_score(y, score)) if y.sum() > 0 else float("nan")


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


@dataclass(frozen=True)
class PairedComparison:
    """Two models' AUROC on the same images, and a bootstrap confidence interval of their difference."""

    new_auroc: float
    old_auroc: float
    diff: float  # new - old
    low: float
    high: float
    confidence: float

    @property
    def clear_gain(self) -> bool:
        """The whole interval lies above zero: the new model is better beyond what resampling explains."""
        return self.low > 0

    def describe(self) -> str:
        return (f"AUROC {self.new_auroc:.4f} vs {self.old_auroc:.4f}: difference {self.diff:+.4f}, "
                f"{self.confidence:.0%} interval [{self.low:+.4f}, {self.high:+.4f}]")


def _paired_auroc_diff(y: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC(a) - AUROC(b) for every resample (row) at once, as Mann-Whitney rank sums (ties count half, as in
    sklearn's roc_auc_score). By hand because sklearn scores one resample a call: 2,000 calls took 8 s for 400
    images, where this takes a fraction of a second. A resample without one class counts as no difference."""
    y = np.moveaxis(y, axis, -1).astype(bool)
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = [((stats.rankdata(np.moveaxis(s, axis, -1), axis=-1) * y).sum(axis=-1) - n_pos * (n_pos + 1) / 2)
                / (n_pos * n_neg) for s in (a, b)]
    return np.where((n_pos > 0) & (n_neg > 0), aucs[0] - aucs[1], 0.0)


def compare_paired(y: np.ndarray, new: np.ndarray, old: np.ndarray, *, confidence: float = 0.95,
                   n_resamples: int = 2000, seed: int = 0) -> PairedComparison:
    """AUROC(new) - AUROC(old) on the same images with a paired bootstrap interval (scipy.stats.bootstrap:
    the images are resampled together, so what both models find hard cancels out). Both classes must be there."""
    y, new = _check(y, new)
    _, old = _check(y, old)
    if y.min() == y.max():
        raise ValueError("a paired AUROC comparison needs both defects and normals")

    res = stats.bootstrap((y, new, old), _paired_auroc_diff, paired=True, vectorized=True, batch=250,
                          n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          rng=np.random.default_rng(seed))
    new_auc, old_auc = auroc(y, new), auroc(y, old)
    return PairedComparison(new_auc, old_auc, new_auc - old_auc, float(res.confidence_interval.low),
                            float(res.confidence_interval.high), confidence)

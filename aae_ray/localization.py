"""Defect localization metrics of the MVTec AD benchmark: pixel AUROC and AUPRO.

Both take ground-truth masks (N, H, W) in {0, 1} and anomaly maps (N, H, W), higher meaning more abnormal.
Pixel AUROC weighs every defect pixel alike, so one large defect dominates it; AUPRO weighs every connected defect
region alike, so a detector must find the small ones too (Bergmann et al., "The MVTec Anomaly Detection Dataset: A
Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV 2021, section 3.3).

Image-level rates at a threshold are aae_ray.scoring.rates_at.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

# Regions are 8-connected, as in the MVTec evaluation code: a diagonal thin crack is one region, not many.
_STRUCTURE = np.zeros((3, 3, 3), dtype=int)
_STRUCTURE[1] = 1  # connects pixels within one image only, so all images are labeled in one call


def _check(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float64)  # float32 maps stay float32: sorting them is twice as fast
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected masks and maps of the same shape (N, H, W), got {masks.shape} and {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return masks > 0.5, maps


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images; NaN when there is no defect pixel or no normal pixel."""
    masks, maps = _check(masks, maps)
    y = masks.ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, maps.ravel()))


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, n_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, pro, thresholds) of the rule "map >= threshold", thresholds descending, with (0, 0) at +inf first.

    fpr is over all normal pixels (outside the masks of all images); pro is the mean over all connected defect
    regions of all images of the fraction of the region's pixels at or above the threshold. With n_thresholds None
    every distinct map value is a threshold (the exact curve); otherwise that many quantiles of the map values.

    Vectorised by binning: each pixel is counted at every threshold at or below its value, so a weighted histogram
    of "how many thresholds lie below this pixel" turned into a reverse cumulative sum gives all points at once.
    """
    masks, maps = _check(masks, maps)
    labels, n_regions = ndimage.label(masks, structure=_STRUCTURE)
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("a PRO curve needs at least one defect region and one normal pixel")
    # Pixel i is at or above thresholds[:k_i], k_i = searchsorted(thresholds, value_i, "right"); bin k of a
    # histogram collects the pixels with k_i = k.
    if n_thresholds is None:
        thresholds, inverse = np.unique(maps.ravel(), return_inverse=True)
        k = inverse + 1  # one sort; a searchsorted of millions of values into millions is several times slower
    else:
        if n_thresholds < 2:
            raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}")
        thresholds = np.unique(np.quantile(maps, np.linspace(0, 1, n_thresholds)))
        k = np.searchsorted(thresholds, maps.ravel(), side="right")
    flat_labels = labels.ravel()
    n_bins = len(thresholds) + 1
    normal = flat_labels == 0
    fp_hist = np.bincount(k[normal], minlength=n_bins) / n_normal
    region_size = np.bincount(flat_labels)  # [0] counts normal pixels, unused
    weight = 1.0 / (region_size[flat_labels[~normal]] * n_regions)
    pro_hist = np.bincount(k[~normal], weights=weight, minlength=n_bins)

    # Value at thresholds[j] = sum of bins k > j. Reverse so thresholds descend and fpr ascends from 0.
    fpr = np.cumsum(fp_hist[::-1])[:-1]
    pro = np.cumsum(pro_hist[::-1])[:-1]
    fpr, pro = np.minimum(np.r_[0.0, fpr], 1.0), np.minimum(np.r_[0.0, pro], 1.0)  # float sums may pass 1 by an ulp
    return fpr, pro, np.r_[np.inf, thresholds[::-1]]


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], x ascending from 0; the last point is interpolated at x_max."""
    i = int(np.searchsorted(x, x_max, side="right"))  # x[:i] <= x_max < x[i]
    xs, ys = x[:i], y[:i]
    if i < len(x):  # then x[i - 1] <= x_max < x[i]
        y_end = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_end]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, n_thresholds: int | None = None) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit: 1 is perfect,
    a random map scores about fpr_limit / 2. NaN when there is no defect region or no normal pixel.

    None of the libraries this project depends on computes it (anomalib has one but is not a dependency), hence
    this implementation, checked against a straightforward loop in tests/test_localization.py.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    masks_b, _ = _check(masks, maps)
    if not masks_b.any() or masks_b.all():
        return float("nan")
    fpr, pro, _ = pro_curve(masks, maps, n_thresholds)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit

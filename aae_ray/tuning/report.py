"""Figures for the report of a hyper-parameter tuning run of the T² anomaly detector.

After a tuning run, someone has to decide whether the best trial is worth promoting and whether the search itself was
sound. These PNGs answer that at a glance: how well the T² score separates defects (y = 1) from normals (y = 0)
(ROC curves, T² histograms against the threshold), which hyper-parameters mattered (importances), and how the search
progressed (metric by trial).

The importance and trial figures are drawn here rather than by `optuna.visualization.matplotlib`: optuna's trial
history leaves failed trials out (a NaN loss must stay visible), its importance plot has no empty state, and both go
through pyplot's global state.

Pure plotting: no Ray, no pyplot. Each figure is an object-oriented matplotlib `Figure` rendered by the Agg canvas
that `savefig` picks for PNG, so nothing here touches pyplot's global figure list or the process-wide backend, and
the functions are safe to call from workers and tests alike.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from aae_ray.scoring import auroc, ranked_finite

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes

FIGSIZE = (6.0, 4.5)  # inches
DPI = 100
LOG_BINS_DECADES = 2.0  # T² of defects can run orders of magnitude above normals: linear bins would crush normals
# PED-ANOVA's default target quantile (10%) leaves a single "good" trial in studies of ~10 trials, and the
# Parzen estimate of one point is mostly noise: measured on a toy objective where one of two parameters dominates,
# 8 random trials ranked the dominant one first in 79% of seeds with the default, 98.5% with >= 4 good trials.
MIN_TARGET_TRIALS = 4
DEFAULT_TARGET_QUANTILE = 0.1
MAX_TARGET_QUANTILE = 0.5  # beyond half the trials "good" stops meaning anything


# --- ROC -----------------------------------------------------------------------------------------------------


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the rules `score >= t` for every distinct score t, from (0, 0) to (1, 1).

    Equal scores form one step: a threshold cannot split them, so drawing them one by one would invent
    operating points that depend on the input order. Needs both classes (ValueError otherwise)."""
    from sklearn.metrics import roc_curve

    y, score = _check_labels(y, score)
    if y.min() == y.max():
        raise ValueError("a ROC curve needs both classes")
    fpr, tpr, _ = roc_curve(y, ranked_finite(score), drop_intermediate=False)  # a point per distinct score
    return fpr, tpr


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """One ROC curve per label: curves[label] = (y, score). The legend shows each curve's AUROC (3 decimals).

    A curve whose y holds only one class is left out and named in the legend as 'label: n/a (one class)', so a
    split without defects shows up as missing rather than silently vanishing. Draws the chance diagonal."""
    return _save(_roc_figure(curves, title), path)


def _roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    checked = {label: _check_labels(*pair) for label, pair in curves.items()}  # all errors before any drawing
    fig, ax = _figure(title)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for label, (y, score) in checked.items():
        if len(np.unique(y)) < 2:
            ax.plot([], [], " ", label=f"{label}: n/a (one class)")  # invisible handle: only the legend entry
            continue
        fpr, tpr = roc_points(y, score)
        ax.plot(fpr, tpr, label=f"{label}: AUROC = {auroc(y, score):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (normals flagged)")
    ax.set_ylabel("true positive rate (defects caught)")
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="lower right", fontsize="small")
    return fig


# --- T² histogram --------------------------------------------------------------------------------------------


def t2_histogram(
    t2: np.ndarray, y: np.ndarray | None, threshold: float, ucl_f: float | None, path: Path, title: str
) -> Path:
    """Histograms of T² for normals and defects (y None: one histogram of all), on shared bins, log-spaced if the
    range spans more than two decades. A vertical line marks the threshold and, if given and different, a dashed
    line the F-distribution UCL. Each histogram shows shares of its own class, so a handful of defects stays visible
    next to thousands of normals."""
    return _save(_t2_figure(t2, y, threshold, ucl_f, title), path)


def _t2_figure(t2: np.ndarray, y: np.ndarray | None, threshold: float, ucl_f: float | None, title: str) -> Figure:
    t2 = np.asarray(t2, dtype=np.float64)
    if t2.ndim != 1 or len(t2) == 0 or not np.isfinite(t2).all():
        raise ValueError("t2 must be a non-empty 1-D array of finite values")
    groups: list[tuple[str, np.ndarray]]
    if y is None:
        groups = [("all", t2)]
    else:
        y, _ = _check_labels(y, t2)
        groups = [(name, t2[y == cls]) for name, cls in (("normal", 0), ("defect", 1)) if (y == cls).any()]
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if ucl_f is not None and math.isnan(ucl_f):
        ucl_f = None  # Hotelling keeps NaN when the F limit was never computed: same as not given

    bins, log_x = _t2_bins(t2)
    fig, ax = _figure(title)
    for (name, values), color in zip(groups, ("tab:blue", "tab:orange"), strict=False):
        if log_x:
            values = np.maximum(values, bins[0])  # T² == 0 has no place on a log axis: count it in the first bin
        ax.hist(
            values,
            bins=bins,
            weights=np.full(len(values), 1 / len(values)),
            alpha=0.55,
            color=color,
            label=f"{name} (n={len(values)})",
        )
    calibrated = ucl_f is None or not math.isclose(threshold, ucl_f, rel_tol=1e-9)
    kind = "calibrated" if calibrated else "F-distribution UCL"
    ax.axvline(threshold, color="black", linewidth=1.5, label=f"threshold ({kind}) = {threshold:.4g}")
    if ucl_f is not None and calibrated:
        ax.axvline(ucl_f, color="black", linestyle="--", linewidth=1.0, label=f"F-distribution UCL = {ucl_f:.4g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("Hotelling's T²" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("share of class")
    ax.legend(fontsize="small")
    return fig


def _t2_bins(t2: np.ndarray) -> tuple[np.ndarray, bool]:
    n_bins = int(np.clip(round(math.sqrt(len(t2))) * 2, 10, 60))
    positive = t2[t2 > 0]
    if len(positive) and positive.max() / positive.min() > 10**LOG_BINS_DECADES:
        return np.geomspace(positive.min(), positive.max(), n_bins + 1), True
    lo, hi = float(t2.min()), float(t2.max())
    if lo == hi:  # one distinct value: give the bar a width so it renders
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1), False


# --- importances ---------------------------------------------------------------------------------------------


def importances(values: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bar chart of parameter importances, largest on top. An empty dict gives a figure that says
    'not enough completed trials', so the report keeps the same set of files whatever the run produced."""
    return _save(_importances_figure(values, title), path)


def _importances_figure(values: dict[str, float], title: str) -> Figure:
    if any(not math.isfinite(v) for v in values.values()):
        raise ValueError(f"importances must be finite: {values}")
    fig, ax = _figure(title)
    if not values:
        ax.text(0.5, 0.5, "not enough completed trials", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    names = [k for k, _ in ranked]
    heights = [v for _, v in ranked]
    ax.barh(range(len(ranked)), heights, color="tab:blue")
    ax.set_yticks(range(len(ranked)), names)
    ax.invert_yaxis()  # barh counts upwards; the largest belongs on top
    for i, v in enumerate(heights):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize="small")
    ax.set_xlim(0, max(max(heights), 1e-12) * 1.15)  # room for the value labels
    ax.set_xlabel("importance (share of total)")
    ax.set_ylabel("hyper-parameter")
    return fig


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances of `study`, normalised to sum to 1 and ordered largest first; {} when they
    cannot be told: fewer than 2 COMPLETE trials, no parameter that varies, or optuna raising on the study.

    Uses PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`), optuna 5's default evaluator, named
    explicitly because it needs no scikit-learn (fANOVA and mean-decrease-impurity do, and it is not a dependency
    here) and so that a change of optuna's default cannot bring that requirement in. Its target quantile is raised
    for small studies so that at least MIN_TARGET_TRIALS trials count as good (see the constant)."""
    import optuna  # lazy: the plotting functions must work where optuna is not installed

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.values is not None and all(math.isfinite(v) for v in t.values)
    ]
    if len(complete) < 2:
        return {}
    quantile = min(MAX_TARGET_QUANTILE, max(DEFAULT_TARGET_QUANTILE, MIN_TARGET_TRIALS / len(complete)))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    try:
        # Optuna warns on small studies and on normalize=False (experimental); the caller can do nothing about it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    except (RuntimeError, ValueError, ZeroDivisionError, ImportError):
        return {}
    total = sum(raw.values())
    # All zero means nothing varied (or nothing separated good trials): optuna would report equal shares, which
    # reads as "everything matters equally" rather than "unknown".
    if not raw or not math.isfinite(total) or total <= 0:
        return {}
    # Sorted here because optuna collects parameter names in a set: ties would otherwise come out in hash order.
    return dict(sorted(((k, float(v) / total) for k, v in raw.items()), key=lambda kv: (-kv[1], kv[0])))


# --- metric by trial -----------------------------------------------------------------------------------------


def metric_by_trial(
    values: list[float | None], best_so_far: bool, path: Path, title: str, ylabel: str, *, maximize: bool = True
) -> Path:
    """Scatter of each trial's final metric in trial order (numbered from 0, as Ray and optuna number them).

    None (or NaN) is a failed trial, drawn as a red x at the bottom edge so failures stay visible whatever the
    metric's range. With `best_so_far`, a step line follows the best metric reached up to each trial (the highest,
    or the lowest if not `maximize`)."""
    return _save(_metric_figure(values, best_so_far, title, ylabel, maximize), path)


def _metric_figure(values: list[float | None], best_so_far: bool, title: str, ylabel: str, maximize: bool) -> Figure:
    metric = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if np.isinf(metric).any():
        raise ValueError("metric values must be finite, None or NaN")
    ok = ~np.isnan(metric)
    trials = np.arange(len(metric))
    fig, ax = _figure(title)
    if ok.any():
        ax.scatter(trials[ok], metric[ok], s=22, color="tab:blue", zorder=3, label="trial")
    if (~ok).any():
        # x in data, y in axes coordinates: pinned to the bottom edge independent of the metric's range.
        ax.scatter(
            trials[~ok],
            np.full((~ok).sum(), 0.03),
            marker="x",
            color="red",
            s=40,
            zorder=4,
            transform=ax.get_xaxis_transform(),
            label=f"failed ({int((~ok).sum())})",
        )
    if best_so_far and ok.any():
        pick = np.fmax if maximize else np.fmin  # fmax/fmin skip NaN, so failed trials keep the running best
        running = pick.accumulate(metric)
        start = int(np.argmax(ok))
        ax.plot(trials[start:], running[start:], drawstyle="steps-post", color="tab:green", label="best so far")
    if len(metric) == 0:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xlim(-0.5, len(metric) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    if ok.any() or (~ok).any():
        ax.legend(fontsize="small")
    return fig


# --- shared --------------------------------------------------------------------------------------------------


# --- AUROC x latency ---------------------------------------------------------------------------------------


def pareto(ms: list[float], values: list[float], on_front: list[bool], chosen: int | None, budget: float | None,
           path: Path, title: str, ylabel: str) -> Path:
    """Each timed trial's metric against its scoring time (milliseconds per image, log axis: models differ by
    factors), the front as a step line through its trials, the latency budget as a dashed line and the chosen
    trial (index into the lists) ringed."""
    return _save(_pareto_figure(ms, values, on_front, chosen, budget, title, ylabel), path)


def _pareto_figure(ms: list[float], values: list[float], on_front: list[bool], chosen: int | None,
                   budget: float | None, title: str, ylabel: str) -> Figure:
    x, y, f = np.asarray(ms, np.float64), np.asarray(values, np.float64), np.asarray(on_front, bool)
    if not (len(x) == len(y) == len(f)) or (len(x) and (x <= 0).any()):
        raise ValueError("pareto: one positive time, one value and one front flag per trial")
    fig, ax = _figure(title)
    if len(x):
        ax.scatter(x[~f], y[~f], s=22, color="tab:gray", zorder=3, label="trial")
        order = np.argsort(x[f])
        ax.plot(x[f][order], y[f][order], drawstyle="steps-post", marker="o", color="tab:blue", zorder=4,
                label=f"front ({int(f.sum())} trials)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20 ... in plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, "no timed trials", ha="center", va="center", transform=ax.transAxes)
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", label=f"budget {budget:g} ms")
    if chosen is not None:
        ax.scatter([x[chosen]], [y[chosen]], s=160, facecolors="none", edgecolors="tab:green", linewidths=2,
                   zorder=5, label="chosen")
    ax.set_xlabel("scoring time (ms per image)")
    ax.set_ylabel(ylabel)
    if len(x) or budget is not None:
        ax.legend(fontsize="small")
    return fig


def _check_labels(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_arr, s = np.asarray(y), np.asarray(score, dtype=np.float64)
    if y_arr.ndim != 1 or s.ndim != 1:
        raise ValueError("labels and scores must be 1-D")
    if len(y_arr) != len(s):
        raise ValueError(f"labels and scores differ in length ({len(y_arr)} != {len(s)})")
    if not set(np.unique(y_arr).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 (normal) or 1 (defect)")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    return y_arr.astype(np.int64), s


def _figure(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path

"""The report folder of a tuning round (WS/rounds/rNNN/report/): what a quality engineer looks at before
trusting the round's model.

    roc.png                  the best model's ROC on val and test (where they hold both classes)
    roc_anomaly_ratio.png    the best architecture retrained at each anomaly ratio (the source research's Fig. 5)
    t2_histogram.png         T2 of normals and defects with the threshold and the F-distribution UCL
    importances.png          Optuna's parameter importances
    trials.png               every trial's final metric in order, and the best so far
    pareto.png, pareto.json  a latency search's trials, metric against ms per image, the front, the budget and
                             the chosen trial; the json lists the front's trials
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna

from aae_ray import artifacts
from aae_ray.dataset import Arrays, labeled_arrays
from aae_ray.detector import Detector
from aae_ray.tuning import report
from aae_ray.tuning.selection import front, usable
from aae_ray.tuning.spec import LATENCY_METRIC, TuneSpec
from aae_ray.workspace import Workspace, write_text

if TYPE_CHECKING:
    from aae_ray.tuning.runner import TrialRow


def write_report(ws: Workspace, round_no: int, spec: TuneSpec, rows: list[TrialRow], study_storage: str,
                 study_name: str, sweep: dict[float | str, Path], chosen: TrialRow | None) -> Path:
    out = ws.round_dir(round_no) / "report"
    out.mkdir(parents=True, exist_ok=True)
    det = artifacts.load(ws.model_dir(round_no))
    splits = {s: labeled_arrays(ws, s, det.config.input_size) for s in ("val", "test")}
    two_class = {s: a for s, a in splits.items() if _both_classes(a)}

    report.roc_curves({f"{s} ({len(a)} images)": (a.y, det.score_samples(a.X)) for s, a in two_class.items()},
                      out / "roc.png", f"Round {round_no}: best trial's model")
    if sweep:
        shown = "test" if "test" in two_class else "val" if "val" in two_class else None
        if shown is not None:
            curves = {f"anomaly ratio {r}": (two_class[shown].y, _t2(artifacts.load(p), two_class[shown]))
                      for r, p in sorted(sweep.items(), key=lambda kv: _ratio_order(kv[0]))}
            report.roc_curves(curves, out / "roc_anomaly_ratio.png",
                              f"Best architecture at each anomaly ratio ({shown} split)")
    hist_split = "test" if "test" in two_class else "val" if "val" in two_class else None
    if hist_split is not None:
        a = two_class[hist_split]
        t2, y = det.score_samples(a.X), a.y
    else:  # no labels anywhere yet: the training normals' spread is still worth seeing
        a = splits["val"]
        t2, y = det.score_samples(a.X), None
    name = {"global": "T2", "local": "local T2", "combined": "combined T2"}.get(det.primary_,
                                                                                f"{det.config.family} score")
    ucl = det.limit_.ucl_f if det.primary_ == "global" else float("nan")  # the F limit is the global T2's
    report.t2_histogram(t2, y, det.threshold_, ucl, out / "t2_histogram.png",
                        f"{name} on {hist_split or 'val'} ({det.limit_.method} threshold)")
    study = optuna.load_study(study_name=study_name, storage=study_storage)
    report.importances(report.param_importances(study), out / "importances.png", "Parameter importances (Optuna)")
    report.metric_by_trial([r.metric for r in rows], True, out / "trials.png", "Trials in order", spec.metric)
    if spec.latency is not None:
        write_front(out, spec, rows, chosen)
    return out


def write_front(out: Path, spec: TuneSpec, rows: list[TrialRow], chosen: TrialRow | None) -> None:
    """pareto.png and pareto.json of a latency search (what `select.max_ms_per_image` chooses from)."""
    timed, on_front = usable(rows, spec), front(rows, spec)
    budget = spec.select.max_ms_per_image
    lat = spec.latency
    report.pareto([r.ms_per_image for r in timed], [r.metric for r in timed], [r in on_front for r in timed],
                  timed.index(chosen) if chosen in timed else None, budget, out / "pareto.png",
                  f"{spec.metric} x scoring time ({lat.engine}, batch {lat.batch_size})", spec.metric)
    write_text(out / "pareto.json", json.dumps({
        "metric": spec.metric, "max_ms_per_image": budget, "engine": lat.engine, "batch_size": lat.batch_size,
        "chosen": chosen.trial_id if chosen else None, "timed_trials": len(timed),
        "front": [{"trial": r.trial_id, spec.metric: r.metric, LATENCY_METRIC: r.ms_per_image,
                   "latency_engine": r.latency_engine, "params": r.params} for r in on_front]},
        indent=2, default=str) + "\n")


def _both_classes(a: Arrays) -> bool:
    return len(a) > 0 and a.y.min() == 0 and a.y.max() == 1


def _t2(det: Detector, a: Arrays) -> np.ndarray:
    return det.score_samples(a.X)


def _ratio_order(ratio: float | str) -> tuple[int, float]:
    """Shares in increasing order, then "all" (every confirmed defect once)."""
    return (1, 0.0) if ratio == "all" else (0, float(ratio))

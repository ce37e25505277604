"""The report folder of a tuning round (WS/rounds/rNNN/report/): what a quality engineer looks at before
trusting the round's model.

    roc.png                  the best model's ROC on val and test (where they hold both classes)
    roc_anomaly_ratio.png    the best architecture retrained at each anomaly ratio (the source research's Fig. 5)
    t2_histogram.png         T2 of normals and defects with the threshold and the F-distribution UCL
    importances.png          Optuna's parameter importances
    trials.png               every trial's final metric in order, and the best so far
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna

from aae_ray import artifacts
from aae_ray.dataset import Arrays, labeled_arrays
from aae_ray.detector import Detector
from aae_ray.tuning import report
from aae_ray.tuning.spec import TuneSpec
from aae_ray.workspace import Workspace


def write_report(ws: Workspace, round_no: int, spec: TuneSpec, trial_values: list[float | None],
                 study_storage: str, study_name: str, sweep: dict[float | str, Path]) -> Path:
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
    report.metric_by_trial(trial_values, True, out / "trials.png", "Trials in order", spec.metric)
    return out


def _both_classes(a: Arrays) -> bool:
    return len(a) > 0 and a.y.min() == 0 and a.y.max() == 1


def _t2(det: Detector, a: Arrays) -> np.ndarray:
    return det.score_samples(a.X)


def _ratio_order(ratio: float | str) -> tuple[int, float]:
    """Shares in increasing order, then "all" (every confirmed defect once)."""
    return (1, 0.0) if ratio == "all" else (0, float(ratio))

"""The train stage: a round's model trained on the workspace's training data, evaluated on val and test, its
threshold set and recorded, saved with what it was trained on; and the promoted model re-calibrated on new
normals. The epoch loop itself is aae_ray.training_loop; Tune's trials (aae_ray.tuning.trainable) share this
module's evaluation and metrics."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aae_ray import artifacts, scoring
from aae_ray.config import AAEConfig
from aae_ray.dataset import Arrays, calibration_arrays, labeled_arrays, training_arrays
from aae_ray.detector import Detector
from aae_ray.diagnostics import prior_fit
from aae_ray.training_loop import EpochLog
from aae_ray.workspace import Workspace, now

Echo = Callable[[str], None]
def train_round(ws: Workspace, cfg: AAEConfig, *, round_no: int = 0, echo: Echo = print, progress: bool = False,
                init: Detector | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Train one model on the workspace's training data, evaluate it, save it as round `round_no` (in `folder`,
    by default the round's model folder). `init`: start from this detector's weights (a warm start)."""
    data = training_arrays(ws, cfg.input_size)
    n_def = int(data.y.sum())
    echo(f"training {cfg.family} on {len(data) - n_def} presumed-normal images and {n_def} confirmed defects "
         f"(anomaly_ratio {cfg.anomaly_ratio}, defect_loss {cfg.defect_loss}), {cfg.epochs} epochs")

    def on_epoch(log: EpochLog, _model) -> None:
        losses = "  ".join(f"{k} {v:.4f}" for k, v in log.losses.items())
        echo(f"epoch {log.epoch:>3}/{cfg.epochs}  {losses}  {log.images_per_s:,.0f} img/s")

    calibration = calibration_arrays(ws, cfg.input_size)
    det = Detector(cfg).fit(data.X, data.y, known=data.known, X_calibration=calibration.X, init=init,
                            on_epoch=on_epoch, progress=progress)
    echo(det.limit_.describe())
    if det.contamination_ is not None:
        echo(f"t2_trim auto: {det.t2_trim_:.1%} of the training codes left out of T2's fit; "
             f"{det.contamination_.describe()}")
    metrics = {"round": round_no, "trial": None, "data_fingerprint": fingerprint(data),
               **evaluate(ws, det), "n_train": det.n_train_, "n_defects_mixed": det.n_defects_mixed_,
               **threshold_metrics(det),
               "train_images_per_s": float(np.median([h.images_per_s for h in det.history_])) if det.history_ else None,
               "final_losses": det.history_[-1].losses if det.history_ else {}}
    normals = data.X[data.y == 0]
    metrics["prior_fit"] = prior_fit(det.encode(normals[:5000]), seed=cfg.seed)
    artifacts.save(det, folder or ws.model_dir(round_no), metrics, trained_on=trained_ids(data.ids, det))
    return metrics


def threshold_metrics(det: Detector) -> dict[str, Any]:
    """What metrics.json says about the threshold: its value, where it came from, and on how many normals."""
    lim = det.limit_
    return {"threshold": det.threshold_, "threshold_method": lim.method, "threshold_basis": lim.method,
            "n_calibration": lim.n_heldout, "threshold_note": lim.describe(), "ucl_f": lim.ucl_f,
            "primary_score": det.primary_, "t2_trim": det.t2_trim_, **_contamination(det)}


def _contamination(det: Detector) -> dict[str, Any]:
    c = det.contamination_  # None unless fit estimated it (t2_trim: auto)
    return {} if c is None else {"contamination": {**dataclasses.asdict(c), "note": c.describe()}}


def trained_ids(ids, det: Detector) -> list[str]:
    """The ids of a fit's images minus the known normals it held out for its threshold."""
    held = set(det.calibration_idx_.tolist())
    return [id_ for i, id_ in enumerate(ids) if i not in held]


def recalibrate(ws: Workspace, echo: Echo = print) -> dict[str, Any]:
    """Re-set the promoted model's threshold on every normal known now that it never trained on (new labels,
    new val images), weights untouched; re-promote it so that a running `aae-ray serve` picks the new limit
    up. Returns {"round", "before", "after"} (threshold_metrics of each)."""
    folder = ws.current_model_dir()
    round_no = int(ws.current()["round"])
    det = artifacts.load(folder)
    trained = artifacts.read_trained_on(folder)
    if trained is None:
        table = ws.images()
        trained = {i for i, sp in zip(table.column("id").to_pylist(), table.column("split").to_pylist(),
                                      strict=True) if sp in ("train", "pool")}
        echo(f"round {round_no}'s model does not record which images it trained on; every train and pool image "
             "counts as trained on, so only val normals and later imports calibrate it")
    cal = calibration_arrays(ws, det.config.input_size, trained_on=trained)
    before = threshold_metrics(det)
    det.calibrate(cal.X)
    after = threshold_metrics(det)
    if after["threshold"] != before["threshold"] or after["n_calibration"] != before["n_calibration"]:
        artifacts.save_limit(det, folder, {**after, **evaluate(ws, det), "recalibrated_at": now()})
        ws.promote(round_no, f"recalibrated on {after['n_calibration']} known normals: threshold "
                             f"{before['threshold']:.4g} -> {after['threshold']:.4g} ({after['threshold_basis']})")
    return {"round": round_no, "before": before, "after": after}


def evaluate(ws: Workspace, det: Detector) -> dict[str, Any]:
    """Val and test metrics (null where a split lacks either class); test truth is for reporting only."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        arr = labeled_arrays(ws, split, det.config.input_size)
        out[f"{split}_auroc"] = None
        if len(arr) == 0 or arr.y.min() == arr.y.max():
            continue
        s = det.score(arr.X)
        out[f"{split}_auroc"] = scoring.auroc(arr.y, s.score)
        out[split] = {**scoring.summary(arr.y, s.score, det.threshold_),
                      "t2_auroc": scoring.auroc(arr.y, s.t2),
                      "recon_auroc": scoring.auroc(arr.y, s.recon_error), "n": len(arr),
                      "n_defect": int(arr.y.sum())}
    return out


def fingerprint(data: Arrays) -> str:
    return fingerprint_ids(data.ids, data.y)


def fingerprint_ids(ids, y: np.ndarray) -> str:
    """Which images, with which labels, a model was trained on (not their pixels: ids are content-stable)."""
    h = hashlib.sha1()
    for id_, label in sorted(zip(ids, np.asarray(y).tolist(), strict=True)):
        h.update(f"{id_}:{label};".encode())
    return h.hexdigest()[:16]

"""One Tune trial: train a Detector with the sampled config, report the objective every epoch, save the model.

Lives in the installed package because Ray workers import trainables by module name.
Every epoch but the last reports a quick objective (T2 fitted on up to 2,000 training normals with the
model as it is); ASHA stops weak trials on it. The last epoch reports the finished detector's objective
(precise BatchNorm, calibrated threshold) together with the model artifact as the trial's checkpoint; in a
latency search (`latency` given), with its scoring time per image too, measured here, on the trial's hardware.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from aae_ray import artifacts, scoring
from aae_ray.config import validate
from aae_ray.detector import Detector
from aae_ray.train import trained_ids
from aae_ray.training_loop import EpochLog, TrainingDiverged, limit_threads, resolve_device
from aae_ray.tuning.spec import LATENCY_METRIC, Latency
from aae_ray.tuning.trial_data import TrialData

QUICK_FIT_IMAGES = 2000
QUICK_NATIVE_IMAGES = 200
DIVERGED_MARKER = "diverged.txt"
# Fault injection for tests: "key=value" poisons the weights of trials whose config has that value after
# epoch 1, so the real divergence check fires (no legal config diverges on demand: clipping saves them all).
INJECT_NAN_ENV = "AAE_RAY_INJECT_NAN"


def train_trial(params: dict[str, Any], data: TrialData, latency: Latency | None = None) -> None:
    if tune.get_checkpoint() is not None:
        # Only the last epoch saves a model, so a trial restored with one had finished (a resume after a kill
        # that landed just as it reported): Tune keeps its last result, training again would only repeat it.
        return
    trial_dir = Path(tune.get_context().get_trial_dir())
    marker = trial_dir / DIVERGED_MARKER
    if marker.exists():  # a retry of a diverged trial: training is deterministic, fail at once with its reason
        raise TrainingDiverged(marker.read_text())
    cfg = validate(params, where="trial config")
    limit_threads(max(1, cfg.num_threads))
    X, y = data.X[cfg.input_size], data.y
    obj_X, obj_y = data.objective_X[cfg.input_size], data.objective_y
    det = Detector(cfg)
    quick_normals = X[y == 0][:QUICK_FIT_IMAGES]
    poison = _poison_requested(params)

    def on_epoch(log: EpochLog, model: torch.nn.Module) -> None:
        if poison and log.epoch == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
            return
        if log.epoch == cfg.epochs:
            return  # the finished detector reports below
        # The model as it is: its statistics on a few normals (fewer for a native score, which needs them only
        # for the reported T2, and whose model may cost a latent search an image: AnoGAN)
        det.fit_statistics(quick_normals[:QUICK_NATIVE_IMAGES] if det.primary_ == "native" else quick_normals)
        untimed = {LATENCY_METRIC: None} if latency is not None else {}  # Tune wants every objective's key
        tune.report({**_objective(det, obj_X, obj_y, data.objective_source), **_epoch_metrics(log), **untimed})

    try:
        det.fit(X, y, known=data.known, X_calibration=data.calibration_X[cfg.input_size], on_epoch=on_epoch)
    except TrainingDiverged as exc:
        marker.write_text(str(exc))
        raise
    final = {**_objective(det, obj_X, obj_y, data.objective_source), **_epoch_metrics(det.history_[-1]),
             "threshold": det.threshold_, "n_train": det.n_train_, "n_defects_mixed": det.n_defects_mixed_}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.save(det, Path(tmp), {"trial": tune.get_context().get_trial_id(), **final},
                       trained_on=trained_ids(data.fingerprint_ids, det))
        if latency is not None:  # the saved artifact, as `aae-ray serve` would load and score it
            final.update(_timed(Path(tmp), obj_X, latency, cfg.num_threads, str(resolve_device(cfg))))
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


def _objective(det: Detector, X: np.ndarray, y: np.ndarray, source: str) -> dict[str, Any]:
    t2 = det.score_samples(X)
    if not np.isfinite(t2).all():
        raise TrainingDiverged("T2 of the objective images is not finite: the codes collapsed or blew up")
    return {"val_auroc": scoring.auroc(y, t2), "val_auprc": scoring.auprc(y, t2), "objective_source": source}


def _timed(model_dir: Path, X: np.ndarray, latency: Latency, threads: int, device: str) -> dict[str, Any]:
    t = latency.time(model_dir, X, threads=max(1, threads), device=device)
    return {LATENCY_METRIC: t.ms_per_image, "latency_engine": t.engine, "latency_passes_ms": list(t.passes_ms)}


def _epoch_metrics(log: EpochLog) -> dict[str, Any]:
    return {"epoch": log.epoch, "images_per_s": log.images_per_s, "threads": torch.get_num_threads(),
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            **{f"loss_{k}": v for k, v in log.losses.items()}}


def _poison_requested(params: dict[str, Any]) -> bool:
    key, sep, value = os.environ.get(INJECT_NAN_ENV, "").partition("=")
    return bool(sep) and key in params and str(params[key]) == value

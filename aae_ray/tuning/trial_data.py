"""What every trial trains and is judged on, decoded once by the driver and shared through Ray's object store.

The objective is AUROC (or AUPRC) on the workspace's `val` split. A first round may have no confirmed defects
in `val`; then the objective is AUROC of held-out normals against synthetic corruptions of the same normals
(`aae_ray.data.corruptions`): a proxy that rewards codes which move when an image's content changes
locally, never a claim about real defects. `TrialData.objective_source` says which one a run used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aae_ray.data.corruptions import corrupt
from aae_ray.data.images import encode_png, to_model_input
from aae_ray.dataset import Arrays, calibration_arrays, labeled_arrays, training_arrays
from aae_ray.workspace import Workspace

MIN_SYNTHETIC = 20  # normals needed to build the synthetic objective
MAX_SYNTHETIC = 1000  # enough for a stable AUROC; more only slows every epoch's check
HOLDOUT_SHARE = 0.1  # of the training normals, when val has too few normals of its own


@dataclass(frozen=True)
class TrialData:
    X: dict[int, np.ndarray]  # input size -> training images (N, 1, S, S)
    y: np.ndarray  # (N,) 1 = confirmed defect
    known: np.ndarray  # (N,) bool: normals known to be good (a share is held out for the threshold)
    calibration_X: dict[int, np.ndarray]  # input size -> known normals outside training (val's) for the threshold
    objective_X: dict[int, np.ndarray]  # input size -> objective images
    objective_y: np.ndarray
    objective_source: str  # "val" (labeled) or "synthetic" (corrupted held-out normals)
    fingerprint_ids: tuple[str, ...]  # the training images, for the artifact's data fingerprint

    def describe(self) -> str:
        n_def = int(self.objective_y.sum())
        if self.objective_source == "val":
            return f"objective: {n_def} defects and {len(self.objective_y) - n_def} normals of the val split"
        return (f"objective: NO confirmed defects in val, so AUROC of {len(self.objective_y) - n_def} held-out "
                f"normals vs {n_def} synthetic corruptions of them (a proxy until defects are labeled)")


def build_trial_data(ws: Workspace, sizes: list[int], seed: int = 0) -> TrialData:
    sizes = sorted(set(sizes))
    train = {s: training_arrays(ws, s) for s in sizes}
    val = {s: labeled_arrays(ws, "val", s) for s in sizes}
    calibration = {s: calibration_arrays(ws, s).X for s in sizes}
    ref_train, ref_val = train[sizes[0]], val[sizes[0]]
    if len(ref_val) and ref_val.y.min() == 0 and ref_val.y.max() == 1:
        return TrialData({s: a.X for s, a in train.items()}, ref_train.y, ref_train.known, calibration,
                         {s: a.X for s, a in val.items()}, ref_val.y, "val", tuple(ref_train.ids))

    rng = np.random.default_rng(seed)
    val_normals = np.flatnonzero(ref_val.y == 0) if len(ref_val) else np.empty(0, dtype=np.int64)
    keep = np.ones(len(ref_train), dtype=bool)
    if len(val_normals) >= MIN_SYNTHETIC:
        source, rows = val, rng.permutation(val_normals)[:MAX_SYNTHETIC]
    else:  # hold some presumed normals out of training instead
        normals = np.flatnonzero(ref_train.y == 0)
        n = min(MAX_SYNTHETIC, max(MIN_SYNTHETIC, round(HOLDOUT_SHARE * len(normals))))
        if len(normals) < 2 * n:
            raise ValueError(f"too few images to tune: val has no defects and only {len(normals)} normal "
                             f"training images remain to build a synthetic objective from")
        source, rows = train, rng.permutation(normals)[:n]
        keep[rows] = False
    largest = source[sizes[-1]].X[rows]
    broken = corrupt(largest, rng)
    # Corrupt once at the largest size, then go through the same preprocessing as real images at every size.
    as_png = [encode_png(np.round(img[0] * 255).astype(np.uint8)) for img in broken]
    objective_X = {s: np.concatenate([source[s].X[rows], to_model_input(as_png, s)]) for s in sizes}
    objective_y = np.concatenate([np.zeros(len(rows), np.int8), np.ones(len(rows), np.int8)])
    return TrialData({s: a.X[keep] for s, a in train.items()}, ref_train.y[keep], ref_train.known[keep],
                     calibration, objective_X, objective_y, "synthetic",
                     tuple(np.asarray(ref_train.ids)[keep].tolist()))


def training_view(data: TrialData, size: int) -> Arrays:
    return Arrays(list(data.fingerprint_ids), data.X[size], data.y, data.known)

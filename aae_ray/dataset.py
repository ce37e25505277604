"""Which images a model trains, tunes and reports on, decoded to model input. The leakage rules live here.

- training: `train` and `pool` images are presumed normal, except confirmed defects (import truth 1 in
  `train`, or a latest label event "defect"); a latest label "normal" clears a defect; pool truth is never read;
- calibration (the threshold): only normals known to be good, never trained on: a share of the known-good
  `train` images and of those labeled "normal" (`Arrays.known`, held out by the Detector), and the `val`
  normals (`calibration_arrays`); never presumed-normal pool images;
- tuning and promotion: `val` images with known truth;
- reporting only: `test` images with known truth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from aae_ray.data import DEFECT, NORMAL
from aae_ray.data.images import to_model_input
from aae_ray.labels import current_labels
from aae_ray.workspace import Workspace


@dataclass(frozen=True)
class Arrays:
    ids: list[str]
    X: np.ndarray  # float32 (N, 1, S, S) in [0, 1]
    y: np.ndarray  # int8 (N,): 1 defect, 0 normal (presumed normal for training data)
    known: np.ndarray | None = None  # bool (N,): normals known to be good (training data only)

    def __len__(self) -> int:
        return len(self.ids)


def training_arrays(ws: Workspace, size: int) -> Arrays:
    table = ws.images()
    labels = current_labels(ws.labels_dir)
    rows, y, known = [], [], []
    for i, (id_, split, truth) in enumerate(_columns(table, "id", "split", "truth")):
        if split not in ("train", "pool"):
            continue
        label = labels.get(id_)
        imported = truth if split == "train" else None  # pool truth is never read
        defect = label == "defect" or (imported == DEFECT and label != "normal")
        rows.append(i)
        y.append(int(defect))
        known.append(not defect and (label == "normal" or (imported == NORMAL and label is None)))
    arr = _decode(table, rows, np.asarray(y, dtype=np.int8), size)
    return replace(arr, known=np.asarray(known, dtype=bool))


def calibration_arrays(ws: Workspace, size: int, trained_on: set[str] | None = None) -> Arrays:
    """Normals known to be good that a model does not train on, for its threshold. `trained_on` None (at
    training time): the `val` normals; the known normals among the training data are held out by the Detector
    (`Arrays.known`). A set of ids (`aae-ray recalibrate`): every known normal outside it, in `train`, `val`
    or `pool` (imported as normal, or labeled "normal" since). `test` is never used; a label "defect" or
    "skip" removes an image."""
    table = ws.images()
    labels = current_labels(ws.labels_dir)
    rows = []
    for i, (id_, split, truth) in enumerate(_columns(table, "id", "split", "truth")):
        label = labels.get(id_)
        if split == "test" or label in ("defect", "skip"):
            continue
        known_normal = label == "normal" or (split in ("train", "val") and truth == NORMAL)
        outside = split == "val" if trained_on is None else id_ not in trained_on
        if known_normal and outside:
            rows.append(i)
    return _decode(table, rows, np.zeros(len(rows), dtype=np.int8), size)


def labeled_arrays(ws: Workspace, split: str, size: int) -> Arrays:
    table = ws.images()
    picked = [(i, t) for i, (s, t) in enumerate(_columns(table, "split", "truth")) if s == split and t is not None]
    rows = [i for i, _ in picked]
    return _decode(table, rows, np.asarray([t for _, t in picked], dtype=np.int8), size)


def pool_arrays(ws: Workspace, size: int) -> Arrays:
    table = ws.images()
    rows = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "pool"]
    return _decode(table, rows, np.zeros(len(rows), dtype=np.int8), size)


def _columns(table, *names: str):
    return zip(*(table.column(n).to_pylist() for n in names), strict=True)


def _decode(table, rows: list[int], y: np.ndarray, size: int) -> Arrays:
    sub = table.take(rows) if rows else table.slice(0, 0)
    ids = sub.column("id").to_pylist()
    return Arrays(ids, to_model_input(sub.column("image").to_pylist(), size), y)

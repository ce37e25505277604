"""Which images a model trains, tunes and reports on, decoded to model input. The leakage rules live here.

- training: `train` and `pool` images are presumed normal, except confirmed defects (import truth 1 in
  `train`, or a latest label event "defect"); a latest label "normal" clears a defect; pool truth is never read;
- tuning and promotion: `val` images with known truth;
- reporting only: `test` images with known truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aae_ray.data import DEFECT
from aae_ray.data.images import to_model_input
from aae_ray.labels import current_labels
from aae_ray.workspace import Workspace


@dataclass(frozen=True)
class Arrays:
    ids: list[str]
    X: np.ndarray  # float32 (N, 1, S, S) in [0, 1]
    y: np.ndarray  # int8 (N,): 1 defect, 0 normal (presumed normal for training data)

    def __len__(self) -> int:
        return len(self.ids)


def training_arrays(ws: Workspace, size: int) -> Arrays:
    table = ws.images()
    labels = current_labels(ws.labels_dir)
    rows, y = [], []
    for i, (id_, split, truth) in enumerate(_columns(table, "id", "split", "truth")):
        if split not in ("train", "pool"):
            continue
        known_defect = split == "train" and truth == DEFECT
        label = labels.get(id_)
        defect = label == "defect" or (known_defect and label != "normal")
        rows.append(i)
        y.append(int(defect))
    return _decode(table, rows, np.asarray(y, dtype=np.int8), size)


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

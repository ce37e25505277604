"""How long a trained model takes to score an image on this machine: the second objective of an AUROC x latency
search (`latency:` in a tuning spec) and what `select: {max_ms_per_image: X}` budgets.

    timing = time_scoring(model_dir, X, engine="auto", batch_size=1)
    timing.ms_per_image        # the median of `repeats` timed passes over X, per image

The time is the whole answer the endpoint gives (every score and the local map), on the engine a replica would
serve the model with: "auto" is ONNX Runtime where the model exports and runs on the CPU, torch otherwise (the
same rule as `aae-ray serve --engine auto`, aae_ray.serving).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from aae_ray import artifacts
from aae_ray.training_loop import limit_threads

Engine = Literal["auto", "torch", "onnx"]
CHECK_IMAGES = 64  # what the export made for timing is checked against the Detector on (aae_ray.export)


@dataclass(frozen=True)
class Timing:
    ms_per_image: float  # the median pass
    engine: str  # what scored: "torch" or "onnxruntime"
    batch_size: int
    images: int  # images per timed pass
    passes_ms: tuple[float, ...]  # every pass's milliseconds per image, in order

    def describe(self) -> str:
        spread = f"{min(self.passes_ms):.3g}-{max(self.passes_ms):.3g}"
        return (f"{self.ms_per_image:.3g} ms/image ({self.engine}, batch {self.batch_size}, median of "
                f"{len(self.passes_ms)} passes over {self.images} images: {spread})")


def time_scoring(model_dir: Path, X: np.ndarray, *, engine: Engine = "auto", batch_size: int = 1, repeats: int = 3,
                 threads: int | None = None, device: str = "cpu") -> Timing:
    """Milliseconds per image to score X (N, 1, S, S) in calls of `batch_size`, after one warm-up call.
    `threads`: the CPU threads scoring may use (the trial's share; None leaves the process's setting)."""
    if not len(X):
        raise ValueError("no images to time scoring on")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
    if threads:
        limit_threads(threads)
    det = artifacts.load(Path(model_dir)).to(device)
    with tempfile.TemporaryDirectory(prefix="aae-ray-timing-") as tmp:
        scorer, used = _scorer(det, Path(model_dir), Path(tmp), X, engine, threads, device)
        scorer.score(X[:batch_size], maps=True)  # warm-up: first-call allocations and lazy initialisation
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(X), batch_size):
                scorer.score(X[i : i + batch_size], maps=True)
            passes.append((time.perf_counter() - start) * 1000 / len(X))
    return Timing(statistics.median(passes), used, batch_size, len(X), tuple(passes))


def _scorer(det, model_dir: Path, tmp: Path, X: np.ndarray, engine: Engine, threads: int | None, device: str):
    """The Detector itself, or its graph in ONNX Runtime (exported into `tmp`, checked on a few of X)."""
    from aae_ray.export import ExportError, export_onnx
    from aae_ray.onnx_engine import OnnxDetector, on_torch

    if on_torch(engine, device):
        return det, "torch"

    try:
        exported = export_onnx(model_dir, tmp / "onnx", X[:CHECK_IMAGES])
    except ExportError:
        if engine == "onnx":
            raise
        return det, "torch"  # AnoGAN, nearest local stats: what a replica serves them with
    return OnnxDetector(det, exported.folder, threads), "onnxruntime"

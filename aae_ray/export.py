"""ONNX export (`aae-ray export`): one graph a model that takes a batch of preprocessed images and returns every
score the model gives, Hotelling's T2 computed inside the graph, plus a JSON of what a scorer needs beside it.

    model.onnx   images float32 (N, 1, S, S) in [0, 1] -> score, t2, t2_local, recon_error (N,), map (N, S, S),
                 codes (N, p)
    model.json   the preprocessing, the primary score, the threshold, alpha, the calibration scores behind the
                 p-values (or the F law's degrees of freedom), the model's round, family and data fingerprint

The graph is the family's own `inference` followed by the statistics a fitted Detector holds as constants (the
latent's mean and precision, each position's mean and precision, the combined score's scales), in float32: the
Detector computes the global T2 in float64, and the two agree to ~1e-6 relative. p-values and the anomaly flag
are left to the scorer (aae_ray.edge): they need the sorted calibration scores, not a graph.

Before it writes anything the exporter checks the graph (onnx.checker) and compares ONNX Runtime's outputs with
the Detector's on the workspace's own images; a difference over `rtol` refuses the export. A family whose
scoring is not a fixed graph is refused with one line: AnoGAN searches its latent per image by gradient descent,
and the nearest-normal local score (`local_stats: nearest`) searches a bank (not exported yet).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aae_ray import artifacts
from aae_ray.detector import Detector
from aae_ray.scoring import LocalHotelling

OUTPUTS = ("score", "t2", "t2_local", "recon_error", "map", "codes")  # codes: the diverse queue's latent
OPSET = 18  # col2im (the patch family's fold) needs 18
FORMAT_VERSION = 1


class ExportError(ValueError):
    """The model cannot be exported, or its graph does not score like the Detector."""


class ScoringGraph(nn.Module):
    """A fitted Detector's scoring as one torch module: what torch.onnx traces."""

    def __init__(self, det: Detector):
        super().__init__()
        if det.config.family == "anogan":
            raise ExportError("AnoGAN cannot be exported: it scores by searching each image's latent code with "
                              "gradient steps, which is no fixed graph (choose another family for the edge)")
        if det.local_ is not None and not isinstance(det.local_, LocalHotelling):
            raise ExportError("a model with local_stats: nearest cannot be exported yet (its local score searches "
                              "a bank of normal feature maps); retrain with local_stats: gaussian to export")
        self.model = det.model_.cpu().eval()
        self.primary = det.primary_
        self.size = det.config.input_size
        self.local_map = det.local_ is not None and det.config.anomaly_map == "local"
        self.scales = {k: float(v) for k, v in det.scales_.items()}
        self.register_buffer("g_mean", torch.tensor(det.hotelling_.mean, dtype=torch.float32))
        self.register_buffer("g_precision", torch.tensor(det.hotelling_.precision, dtype=torch.float32))
        self.local = det.local_ is not None
        if self.local:
            self.register_buffer("l_mean", torch.tensor(det.local_.mean, dtype=torch.float32))  # (L, d)
            self.register_buffer("l_precision", torch.tensor(det.local_.precision, dtype=torch.float32))
            self.topk = int(det.local_.topk)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.inference(x)
        dev = out.codes - self.g_mean
        t2 = ((dev @ self.g_precision) * dev).sum(1)
        err = (out.x_hat - x).pow(2)
        recon = err.flatten(1).mean(1)
        t2_local, amap = torch.full_like(t2, float("nan")), err[:, 0]
        if self.local:
            h, w = out.local.shape[2:]  # the batch stays -1 below: traced as a number, it would be fixed
            q = out.local.flatten(2).permute(2, 0, 1)  # (L, N, d): one batched matmul a position
            dq = q - self.l_mean[:, None, :]
            t2_map = ((dq @ self.l_precision) * dq).sum(-1).permute(1, 0).reshape(-1, h, w)
            flat = t2_map.reshape(-1, h * w)
            k = min(self.topk, h * w)
            t2_local = torch.topk(flat, k, dim=1).values.mean(1) if k > 1 else flat.max(1).values
            if self.local_map:
                amap = self.model.local_to_image(t2_map, self.size)
        score = {"global": t2, "local": t2_local}.get(self.primary)
        if self.primary == "combined":
            score = torch.maximum(t2 / self.scales["global"], t2_local / self.scales["local"])
        elif self.primary == "native":
            score = out.score
        return score, t2, t2_local, recon, amap, out.codes


@dataclass(frozen=True)
class Exported:
    folder: Path
    max_rel_diff: dict[str, float]  # per output, ONNX Runtime against the Detector
    n_checked: int


def sidecar(det: Detector, metrics: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """model.json: everything a scorer needs besides the graph."""
    lim = det.limit_
    return {"format": FORMAT_VERSION, "family": det.config.family, "round": metrics.get("round"),
            "data_fingerprint": metrics.get("data_fingerprint"), "outputs": list(OUTPUTS),
            "preprocessing": {"input_size": det.config.input_size, "mode": "L", "resize": "bilinear",
                              "scale": "1/255"},
            "primary": det.primary_, "threshold": lim.threshold, "alpha": lim.alpha, "threshold_basis": lim.method,
            "calibration": lim.calibration.tolist(), "f_dof": None if lim.f_dof is None else list(lim.f_dof),
            "map_label": det.map_label, "score_label": det.score_label, "artifact": artifact_digest(model_dir)}


ARTIFACT_FILES = ("weights.safetensors", "t2.json", "score.json", "local.safetensors")


def artifact_digest(model_dir: Path) -> str:
    """What the export was made from: a recalibration (score.json) or a new model makes it stale."""
    import hashlib

    h = hashlib.sha1()
    for name in ARTIFACT_FILES:
        path = Path(model_dir) / name
        if path.exists():
            h.update(name.encode() + path.read_bytes())
    return h.hexdigest()


def export_onnx(model_dir: Path, out: Path, X_check: np.ndarray, *, rtol: float = 1e-4) -> Exported:
    """Export the artifact in `model_dir` to `out` (model.onnx + model.json), after checking the graph and its
    outputs against the Detector on `X_check` (N, 1, S, S). ExportError where it cannot or does not match."""
    import onnx

    det = artifacts.load(Path(model_dir))
    graph = ScoringGraph(det)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))  # beside `out`: the final rename is atomic
    try:
        path = tmp / "model.onnx"
        example = torch.zeros((2, 1, det.config.input_size, det.config.input_size))
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=list(OUTPUTS), dynamic_axes={"images": {0: "batch"},
                                                                    **{o: {0: "batch"} for o in OUTPUTS}})
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        diffs = compare(det, path, X_check)
        # The codes are not gated: near zero, their float32 rounding is large relative to themselves, and what
        # they feed (T2, the diverse queue's distances) is checked through t2.
        worst = {k: v for k, v in diffs.items() if v > rtol and k != "codes"}
        if worst:
            raise ExportError(f"the ONNX graph does not score like the model (relative differences {worst} over "
                              f"{rtol:g}); nothing written")
        (tmp / "model.json").write_text(json.dumps(sidecar(det, artifacts.read_metrics(model_dir), model_dir), indent=1,
                                                   allow_nan=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return Exported(out, diffs, len(X_check))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(det: Detector, onnx_path: Path, X: np.ndarray) -> dict[str, float]:
    """Largest relative difference per output, ONNX Runtime against the Detector (NaN where both are NaN)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUTS, session.run(None, {"images": np.ascontiguousarray(X, dtype=np.float32)}), strict=True))
    s = det.score(X, maps=True)
    want = {"score": s.score, "t2": s.t2, "t2_local": s.t2_local, "recon_error": s.recon_error, "map": s.maps,
            "codes": s.codes}
    return {k: rel_diff(got[k], want[k]) for k in OUTPUTS}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    if (np.isnan(a) != np.isnan(b)).any():
        return float("inf")
    a, b = a[~both_nan], b[~both_nan]
    if not a.size:
        return 0.0
    scale = np.maximum(np.abs(b), np.abs(b).max() * 1e-3 + 1e-12)  # maps: near-zero pixels compare to the map's top
    return float((np.abs(a - b) / scale).max())


CHECK_IMAGES = 512  # the workspace images the graph is compared on: the test split first, then the pool


def export_workspace(ws, *, round_no: int | None = None, out: Path | None = None, rtol: float = 1e-4) -> Exported:
    """Export a round's model (default: the promoted one) to `out` (default WS/exports/rNNN-onnx), checked on
    the workspace's own test and pool images."""
    from aae_ray.dataset import labeled_arrays, pool_arrays

    round_no = ws.current()["round"] if round_no is None and ws.current() else round_no
    if round_no is None:
        raise ExportError(f"{ws.root} has no promoted model: name a round with --round")
    model_dir = ws.model_dir(round_no)
    if not (model_dir / "config.json").exists():
        raise ExportError(f"round {round_no} of {ws.root} has no model to export")
    size = artifacts.read_config(model_dir).input_size
    X = np.concatenate([labeled_arrays(ws, "test", size).X, pool_arrays(ws, size).X])[:CHECK_IMAGES]
    if not len(X):
        raise ExportError(f"{ws.root} has no test or pool images to check the export on")
    return export_onnx(model_dir, out or ws.root / "exports" / f"r{round_no:03d}-onnx", X, rtol=rtol)


def ensure_export(ws, round_no: int) -> Path:
    """The round's export (WS/exports/rNNN-onnx), made now if missing or older than the artifact: what
    `--engine onnx` scores with. A file lock keeps replicas that start together from exporting twice."""
    import fcntl

    out = ws.root / "exports" / f"r{round_no:03d}-onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = json.loads((out / "model.json").read_text()).get("artifact")
        except (OSError, ValueError):
            current = None
        if current != artifact_digest(ws.model_dir(round_no)):
            export_workspace(ws, round_no=round_no, out=out)
    return out

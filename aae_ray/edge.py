"""The edge scorer: an exported model (aae_ray.export: model.onnx + model.json) scored with ONNX Runtime, numpy
and Pillow only — no torch, no Ray, no pyarrow — for the small box beside the camera.

    aae-ray-edge MODEL_DIR IMAGE...       # one JSON line an image: the Detector's answer for it

`EdgeScorer(folder).score(images)` takes image files, bytes, or an array already preprocessed (float32
(N, 1, S, S) in [0, 1]) and gives what `aae-ray serve` answers: score, t2, t2_local, recon_error, p_value,
threshold, anomaly. The pixels go through the same `to_model_input` as training, and the p-value is the same
rule as the Detector's limit (conformal on the calibration scores, or the F law of the global T2).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from aae_ray.data.pixels import to_model_input

SCORE_OUTPUTS = ("score", "t2", "t2_local", "recon_error")


class EdgeScorer:
    def __init__(self, folder: Path | str, *, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "model.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{folder}: not an exported model (model.json: {exc})") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.size = int(self.meta["preprocessing"]["input_size"])
        self.threshold = float(self.meta["threshold"])
        self.calibration = np.sort(np.asarray(self.meta["calibration"], dtype=np.float64))

    def preprocess(self, images) -> np.ndarray:
        """Files, bytes or a preprocessed array -> float32 (N, 1, S, S) in [0, 1]."""
        if isinstance(images, np.ndarray):
            X = np.ascontiguousarray(images, dtype=np.float32)
            if X.ndim != 4 or X.shape[1:] != (1, self.size, self.size):
                raise ValueError(f"expected images of shape (N, 1, {self.size}, {self.size}), got {X.shape}")
            return X
        data = [Path(im).read_bytes() if isinstance(im, str | Path) else bytes(im) for im in images]
        return to_model_input(data, self.size)

    def run(self, X: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {"images": X}), strict=True))

    def p_value(self, score: np.ndarray) -> np.ndarray:
        """aae_ray.scoring.ScoreLimit.p_value, in numpy: P(score >= s) for a new normal image."""
        dof = self.meta.get("f_dof")
        if dof:  # the F law needs scipy (aae_ray.scoring's rule); a calibrated limit, numpy alone (below)
            from aae_ray.scoring import f_p_value

            return f_p_value(score, *dof)
        # ScoreLimit.p_value's conformal rule, written again in numpy: importing aae_ray.scoring needs scipy, which
        # the edge install leaves out
        cal = self.calibration
        above = len(cal) - np.searchsorted(cal, np.asarray(score, dtype=np.float64), side="left")
        return (1.0 + above) / (len(cal) + 1.0)

    def score(self, images) -> list[dict[str, Any]]:
        """One dict an image, the fields `aae-ray serve` answers with."""
        out = self.run(self.preprocess(images))
        score = out["score"].astype(np.float64)
        p = self.p_value(score)
        return [{**{k: _num(out[k][i]) for k in SCORE_OUTPUTS}, "p_value": _num(p[i]), "threshold": self.threshold,
                 "anomaly": bool(score[i] > self.threshold)} for i in range(len(score))]


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="aae-ray-edge", description="Score images with an exported aae-ray model "
                                 "(aae-ray export): one JSON line an image.")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("images", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (default: its own)")
    args = ap.parse_args(argv)
    try:
        scorer = EdgeScorer(args.model_dir, threads=args.threads)
        results = scorer.score(args.images)
    except (ValueError, OSError) as exc:
        print(f"aae-ray-edge: error: {exc}", file=sys.stderr)
        return 2
    for path, r in zip(args.images, results, strict=True):
        print(json.dumps({"image": str(path), **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

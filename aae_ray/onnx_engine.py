"""ONNX Runtime as a scoring engine (`aae-ray score --engine onnx`, `aae-ray serve --engine onnx`): the round's
exported graph (aae_ray.export, made on first use) behind the Detector's own `score`, so the pool scorer and the
endpoint call it as they call the Detector.

Why: on 2 CPU cores the graph in ONNX Runtime scored the default AAE 8.7x faster than torch one 32x32 image at a
time and 1.7x at batch 64; at 64x64, 3.4x and 1.05x (bench/results/edge.md): torch's per-call overhead dominates
small batches; the endpoint answered 3.0x the requests of torch at 32 clients (bench/results/serve_engines.md), so
it is what a CPU replica serves with by default (serving.ServeSettings.engine "auto").
Only the scoring pass moves: the config, the limit, the threshold and the p-values are the Detector's.
"""

from __future__ import annotations

import numpy as np

from aae_ray.detector import INFER_BATCH, Detector, Scores, check_images


class OnnxDetector:
    """A fitted Detector whose `score` runs its exported graph in ONNX Runtime (same answers within 1e-4)."""

    def __init__(self, det: Detector, export_dir, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.det = det
        self.session = ort.InferenceSession(str(export_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.config, self.limit_, self.primary_ = det.config, det.limit_, det.primary_
        self.threshold_, self.score_label, self.map_label = det.threshold_, det.score_label, det.map_label

    def score(self, X: np.ndarray, *, maps: bool = True) -> Scores:
        X = check_images(X, self.config.input_size)
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, max(len(X), 1), INFER_BATCH):
            xb = X[i : i + INFER_BATCH] if len(X) else np.zeros((1, *X.shape[1:]), np.float32)
            for k, v in zip(self.outputs, self.session.run(None, {"images": xb}), strict=True):
                parts.setdefault(k, []).append(v[: len(X)])
        out = {k: np.concatenate(v) for k, v in parts.items()}
        score = out["score"].astype(np.float64)
        return Scores(score, out["t2"].astype(np.float64), out["t2_local"].astype(np.float64),
                      self.limit_.p_value(score), score > self.threshold_, out["recon_error"], out["codes"],
                      out["map"] if maps else None)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self.score(X, maps=False).score


def on_torch(engine: str, device: str) -> bool:
    """Whether a model scores on torch rather than ONNX Runtime: asked for, or "auto" on a GPU (ONNX Runtime runs
    on the CPU here). Where "auto" picks ONNX Runtime and the model does not export, callers fall back to torch."""
    return engine == "torch" or (engine == "auto" and device != "cpu")


def load(ws, round_no: int, threads: int | None = None) -> OnnxDetector:
    """The round's model on ONNX Runtime, exported first where its export is missing or stale."""
    from aae_ray import artifacts
    from aae_ray.export import ensure_export

    return OnnxDetector(artifacts.load(ws.model_dir(round_no)), ensure_export(ws, round_no), threads)

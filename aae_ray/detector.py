"""The detector interface every model family sits behind (PyOD's shape, scikit-learn's rules).

    det = Detector(config).fit(X, y)        # X: float32 (N, 1, S, S) in [0, 1]; y: 1 = confirmed defect
    det.score_samples(X)                    # Hotelling's T2: higher = more abnormal
    det.predict(X)                          # 1 where T2 > threshold_ (the F-distribution UCL)

`__init__` only stores; `fit` sets the attributes ending in `_`; their presence means fitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.scoring import Hotelling
from aae_ray.train import EpochCallback, EpochLog, build_model, fit_model, mix_defects

log = logging.getLogger(__name__)
INFER_BATCH = 512


@dataclass(frozen=True)
class Scores:
    t2: np.ndarray
    p_value: np.ndarray
    anomaly: np.ndarray  # bool: t2 > threshold
    recon_error: np.ndarray  # mean squared error per image


class Detector:
    def __init__(self, config: AAEConfig):
        self.config = config

    # --- fitting ------------------------------------------------------------------------------------------

    def fit(
        self, X: np.ndarray, y: np.ndarray | None = None, *, on_epoch: EpochCallback | None = None,
        progress: bool = False,
    ) -> Detector:
        """Train on presumed normals (y != 1) plus confirmed defects (y == 1) at the config's anomaly ratio.

        A `calibration_fraction` of the normals is held out of training. T2's mean and covariance are fitted
        on the training normals' codes; with `threshold: calibrated` the limit and p-values come from the
        held-out normals' T2 (conformal), since the F limit's Gaussian assumption need not hold."""
        cfg = self.config
        X = _check_images(X, cfg.input_size)
        y = np.zeros(len(X), dtype=np.int8) if y is None else np.asarray(y)
        if y.shape != (len(X),):
            raise ValueError(f"y must have one label per image: {y.shape} vs {len(X)} images")
        rng = np.random.default_rng(cfg.seed)
        normal_idx = rng.permutation(np.flatnonzero(y != 1))
        defect_idx = np.flatnonzero(y == 1)
        n_cal = round(cfg.calibration_fraction * len(normal_idx))
        cal_idx, train_idx = normal_idx[:n_cal], normal_idx[n_cal:]
        if len(train_idx) <= cfg.latent_dim + 1:
            raise ValueError(f"need more than latent_dim + 1 = {cfg.latent_dim + 1} normal training images, "
                             f"got {len(train_idx)}")
        mixed = defect_idx[mix_defects(len(train_idx), len(defect_idx), cfg.anomaly_ratio, rng)]
        x = torch.from_numpy(np.concatenate([X[train_idx], X[mixed]]))
        defect = torch.zeros(len(x), dtype=torch.bool)
        defect[len(train_idx):] = True

        torch.manual_seed(cfg.seed)  # the initial weights, too, come from the config's seed
        self.model_ = build_model(cfg)
        self.history_: list[EpochLog] = fit_model(self.model_, x, defect, cfg, on_epoch=on_epoch,
                                                  progress=progress)
        self.n_train_, self.n_defects_mixed_ = len(train_idx), len(mixed)
        self.fit_statistics(X[train_idx], X[cal_idx])
        return self

    def fit_statistics(self, X_normal: np.ndarray, X_heldout: np.ndarray | None = None) -> Detector:
        """(Re)fit T2's mean and covariance on these normals; calibrate the limit on held-out ones if asked."""
        hot = Hotelling.fit(self.encode(X_normal), alpha=self.config.alpha, trim=self.config.t2_trim)
        if self.config.threshold == "calibrated" and X_heldout is not None and len(X_heldout):
            hot = hot.calibrate(self.encode(X_heldout))
        self.hotelling_ = hot
        self.threshold_ = hot.threshold
        return self

    # --- inference ----------------------------------------------------------------------------------------

    def encode(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m.encoder(xb))

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m(xb)[1])

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Hotelling's T2 of each image's latent code."""
        return self.hotelling_.t2(self.encode(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)

    def reconstruction_error(self, X: np.ndarray) -> np.ndarray:
        return self.anomaly_map(X).reshape(len(X), -1).mean(1)

    def anomaly_map(self, X: np.ndarray) -> np.ndarray:
        """Per-pixel squared reconstruction error, (N, S, S)."""
        X = _check_images(X, self.config.input_size)
        return ((self.reconstruct(X) - X) ** 2)[:, 0]

    def score(self, X: np.ndarray) -> Scores:
        """Everything at once, from one forward pass."""
        X = _check_images(X, self.config.input_size)

        def both(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
            z, x_hat = m(xb)
            return torch.cat([z, (x_hat - xb).pow(2).flatten(1).mean(1, keepdim=True)], 1)

        out = self._run(X, both)
        t2 = self.hotelling_.t2(out[:, :-1])
        return Scores(t2, self.hotelling_.p_value(t2), t2 > self.threshold_, out[:, -1])

    def to(self, device: str | torch.device) -> Detector:
        """Run inference on this device (a loaded artifact starts on the CPU)."""
        self.model_.to(device)
        return self

    def _run(self, X: np.ndarray, fn) -> np.ndarray:
        X = _check_images(X, self.config.input_size)
        model = self.model_.eval()
        device = next(model.parameters()).device
        with torch.inference_mode():
            if len(X) == 0:  # run one blank image to learn the output's shape, keep none of it
                return fn(model, torch.zeros((1, *X.shape[1:]), device=device)).cpu().numpy()[:0]
            outs = [fn(model, torch.from_numpy(X[i : i + INFER_BATCH]).to(device)).cpu().numpy()
                    for i in range(0, len(X), INFER_BATCH)]
        return np.concatenate(outs)


def _check_images(X: np.ndarray, size: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1:] != (1, size, size):
        raise ValueError(f"expected images of shape (N, 1, {size}, {size}), got {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size and not (np.isfinite(X).all() and X.min() >= 0.0 and X.max() <= 1.0):
        raise ValueError("expected finite pixel values in [0, 1] (see aae_ray.data.images.to_model_input)")
    return X

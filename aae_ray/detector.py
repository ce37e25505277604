"""The detector interface every model family sits behind (PyOD's shape, scikit-learn's rules).

    det = Detector(config).fit(X, y)        # X: float32 (N, 1, S, S) in [0, 1]; y: 1 = confirmed defect
    det.score_samples(X)                    # the family's primary score: higher = more abnormal
    det.predict(X)                          # 1 where the primary score > threshold_

The primary score is Hotelling's T2 of the latent code for the AAE, and the family's native score for the
others (aae_ray.models: AE reconstruction error, VAE negative ELBO, Deep SAD distance to c, EGBAD and AnoGAN
residual + discriminator-feature loss). Every family has a latent, so `Scores.t2` is always Hotelling's T2 on
it (fitted apart, `hotelling_`); `Scores.score` is the primary score, and `p_value`, `anomaly` and
`threshold_` belong to it (`scorer_`: the Hotelling statistics for the AAE, a `ScoreLimit` for the others).

`__init__` only stores; `fit` sets the attributes ending in `_`; their presence means fitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.scoring import Hotelling, ScoreLimit
from aae_ray.train import EpochCallback, EpochLog, build_model, fit_model, mix_defects

log = logging.getLogger(__name__)
INFER_BATCH = 512


@dataclass(frozen=True)
class Scores:
    t2: np.ndarray  # Hotelling's T2 of the latent code
    p_value: np.ndarray  # of the primary score
    anomaly: np.ndarray  # bool: score > threshold
    recon_error: np.ndarray  # mean squared error per image
    score: np.ndarray  # the primary score: t2 for the AAE, the family's native score for the others


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
        """(Re)fit T2's mean and covariance on these normals (at most the family's `stats_images` of them), and
        the primary score's threshold: calibrated on held-out normals if asked (and there are any), else the F
        limit (T2) or the training quantile."""
        cfg = self.config
        heldout = X_heldout if cfg.threshold == "calibrated" and X_heldout is not None and len(X_heldout) else None
        cap = self.model_.stats_images
        if cap is not None and len(X_normal) > cap:
            X_normal = X_normal[np.sort(np.random.default_rng(cfg.seed).choice(len(X_normal), cap, replace=False))]
        codes, native = self._codes_and_native(X_normal)
        hot = Hotelling.fit(codes, alpha=cfg.alpha, trim=cfg.t2_trim)
        held_codes, held_native = self._codes_and_native(heldout) if heldout is not None else (None, None)
        if held_codes is not None:
            hot = hot.calibrate(held_codes)
        self.hotelling_ = hot
        self.scorer_ = ScoreLimit.fit(native, held_native, cfg.alpha) if native is not None else hot
        self.threshold_ = self.scorer_.threshold
        return self

    def _codes_and_native(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        native = self.model_.native_score
        out = self._run(X, lambda m, xb: _codes_score(m, xb, native))
        return (out[:, :-1], out[:, -1]) if native else (out, None)

    # --- inference ----------------------------------------------------------------------------------------

    def encode(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m.codes(xb))

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m.inference(xb)[1])

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """The primary score of each image (T2 for the AAE, the native score for the other families)."""
        codes, native = self._codes_and_native(X)
        return self.hotelling_.t2(codes) if native is None else native.astype(np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)

    def reconstruction_error(self, X: np.ndarray) -> np.ndarray:
        return self.anomaly_map(X).reshape(len(X), -1).mean(1)

    def anomaly_map(self, X: np.ndarray) -> np.ndarray:
        """Per-pixel squared reconstruction error, (N, S, S)."""
        X = _check_images(X, self.config.input_size)
        return ((self.reconstruct(X) - X) ** 2)[:, 0]

    def score(self, X: np.ndarray) -> Scores:
        """Everything at once, from one forward pass (one latent search for AnoGAN)."""
        X = _check_images(X, self.config.input_size)
        native = self.model_.native_score

        def all_of(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
            z, x_hat, score = m.inference(xb)
            rec = (x_hat - xb).pow(2).flatten(1).mean(1, keepdim=True)  # (B, 1)
            return torch.cat([z, rec] + ([score[:, None]] if native else []), 1)

        out = self._run(X, all_of)
        p = self.config.latent_dim
        t2 = self.hotelling_.t2(out[:, :p])
        primary = out[:, p + 1].astype(np.float64) if native else t2
        return Scores(t2, self.scorer_.p_value(primary), primary > self.threshold_, out[:, p], primary)

    def to(self, device: str | torch.device) -> Detector:
        """Run inference on this device (a loaded artifact starts on the CPU)."""
        self.model_.to(device)
        return self

    def _run(self, X: np.ndarray, fn) -> np.ndarray:
        X = _check_images(X, self.config.input_size)
        model = self.model_.eval()
        device = next(model.parameters()).device
        with torch.no_grad():  # not inference_mode: AnoGAN's latent search needs autograd inside
            if len(X) == 0:  # run one blank image to learn the output's shape, keep none of it
                return fn(model, torch.zeros((1, *X.shape[1:]), device=device)).cpu().numpy()[:0]
            outs = [fn(model, torch.from_numpy(X[i : i + INFER_BATCH]).to(device)).cpu().numpy()
                    for i in range(0, len(X), INFER_BATCH)]
        return np.concatenate(outs)


def _codes_score(m: nn.Module, xb: torch.Tensor, native: bool) -> torch.Tensor:
    if not native:
        return m.codes(xb)
    z, _, score = m.inference(xb)
    return torch.cat([z, score[:, None]], 1)  # (B, p + 1)


def _check_images(X: np.ndarray, size: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1:] != (1, size, size):
        raise ValueError(f"expected images of shape (N, 1, {size}, {size}), got {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size and not (np.isfinite(X).all() and X.min() >= 0.0 and X.max() <= 1.0):
        raise ValueError("expected finite pixel values in [0, 1] (see aae_ray.data.images.to_model_input)")
    return X

"""The detector interface every model family sits behind (PyOD's shape, scikit-learn's rules).

    det = Detector(config).fit(X, y)        # X: float32 (N, 1, S, S) in [0, 1]; y: 1 = confirmed defect
    det.score(X)                            # Scores: every score, the codes, the maps, the reconstruction
    det.score_samples(X)                    # the primary score alone: higher = more abnormal
    det.predict(X)                          # 1 where the primary score > threshold_

Every family has a global latent, so `Scores.t2` is always Hotelling's T2 on it (`hotelling_`); a family with
a local feature map (the AAE's spatial latent, the patch family's pixel patches) also has Hotelling's T2 at
every position (`local_`), whose image-level score is `t2_local` and whose upsampled map is the heat map.
`Scores.score` is the primary score (config `score`; `auto` is the family's choice):
  global    t2;
  local     t2_local;
  combined  max(t2 / q_global, t2_local / q_local), q the (1 - alpha) quantile of each on the training normals,
            so an image far out in either tail is far out in the combined score;
  native    the family's own (AE reconstruction error, VAE negative ELBO, Deep SAD distance, GAN residual).
`p_value`, `anomaly` and `threshold_` belong to the primary score, through one limit type (`limit_`, a
scoring.ScoreLimit): conformal on held-out normals, or the global T2's F limit where asked for.

`__init__` only stores; `fit` sets the attributes ending in `_`; their presence means fitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from aae_ray.config import AAEConfig
from aae_ray.scoring import (
    MAX_TRIM,
    Hotelling,
    LocalHotelling,
    LocalNearest,
    ScoreLimit,
    estimate_contamination,
    needed_for_rank,
)
from aae_ray.training_loop import EpochCallback, EpochLog, build_model, fit_model, mix_defects, place, to_batch

log = logging.getLogger(__name__)
INFER_BATCH = 512
SCORE_LABELS = {"global": "T²", "local": "local T²", "combined": "combined T²"}


@dataclass(frozen=True)
class Scores:
    score: np.ndarray  # the primary score (config `score`)
    t2: np.ndarray  # Hotelling's T2 of the global latent code
    t2_local: np.ndarray  # the image's local T2 score; NaN where the family has no local map
    p_value: np.ndarray  # of the primary score
    anomaly: np.ndarray  # bool: score > threshold
    recon_error: np.ndarray  # mean squared reconstruction error per image
    codes: np.ndarray  # (N, p) the global latent codes
    maps: np.ndarray | None = None  # (N, S, S) the anomaly map (config `anomaly_map`), when asked for
    x_hat: np.ndarray | None = None  # (N, 1, S, S) the reconstruction, when maps are asked for


@dataclass(frozen=True)
class _Raw:
    """What one pass gives before the fitted statistics turn it into scores."""

    codes: np.ndarray
    native: np.ndarray | None
    recon_error: np.ndarray
    t2_local: np.ndarray | None
    maps: np.ndarray | None
    x_hat: np.ndarray | None
    features: np.ndarray | None = None  # (N, d, h, w) the local feature maps, when asked for


class Detector:
    def __init__(self, config: AAEConfig):
        self.config = config

    # --- fitting ------------------------------------------------------------------------------------------

    def fit(
        self, X: np.ndarray, y: np.ndarray | None = None, *, known: np.ndarray | None = None,
        X_calibration: np.ndarray | None = None, init: Detector | None = None, on_epoch: EpochCallback | None = None,
        progress: bool = False,
    ) -> Detector:
        """Train on normals (y != 1) plus confirmed defects (y == 1) at the config's anomaly ratio.

        `known` marks the normals known to be good (default: all of them: the caller vouches for clean data);
        the others are presumed normal, trained on but never calibrated on, since a hidden defect among them
        would raise the limit. A `calibration_fraction` of the known normals is held out of training; together
        with `X_calibration` (normals known to be good that are not in X, e.g. the val split's) they set the
        limit and p-values of the primary score (conformal: no Gaussian assumption need hold). Too few of them
        for the rank at alpha, and the limit falls back (ScoreLimit, `threshold_basis`), with a warning.
        T2's means and covariances are fitted on the training normals' codes. `init`: a fitted detector of the
        same architecture whose weights training starts from (a warm start: `aae-ray round`'s fine-tuned
        candidate)."""
        cfg = self.config
        X = check_images(X, cfg.input_size)
        y = np.zeros(len(X), dtype=np.int8) if y is None else np.asarray(y)
        known = np.ones(len(X), dtype=bool) if known is None else np.asarray(known, dtype=bool)
        for name, a in (("y", y), ("known", known)):
            if a.shape != (len(X),):
                raise ValueError(f"{name} must have one label per image: {a.shape} vs {len(X)} images")
        rng = np.random.default_rng(cfg.seed)
        cal_idx, train_idx = self._split_normals(y, known, rng)
        defect_idx = np.flatnonzero(y == 1)
        torch.manual_seed(cfg.seed)  # the initial weights, too, come from the config's seed
        self.model_ = build_model(cfg)
        if init is not None:
            try:
                self.model_.load_state_dict(init.model_.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"cannot warm-start from a model of another architecture: {str(exc)[:200]}") from None
        self.primary_ = _primary(cfg, self.model_)
        if len(train_idx) <= self.model_.code_dim + 1:
            raise ValueError(f"need more than latent_dim + 1 = {self.model_.code_dim + 1} normal training images, "
                             f"got {len(train_idx)}")
        ratio = 0 if cfg.anomaly_ratio == "all" and not self.model_.learns_from_defects else cfg.anomaly_ratio
        mixed = defect_idx[mix_defects(len(train_idx), len(defect_idx), ratio, rng)]
        x = torch.from_numpy(np.concatenate([X[train_idx], X[mixed]]))
        defect = torch.zeros(len(x), dtype=torch.bool)
        defect[len(train_idx):] = True
        if self.model_.trainable:
            self.history_: list[EpochLog] = fit_model(self.model_, x, defect, cfg, on_epoch=on_epoch,
                                                      progress=progress)
        else:
            self.model_.fit_normals(x[~defect])
            self.model_.eval()
            self.history_ = []
        self.n_train_, self.n_defects_mixed_ = len(train_idx), len(mixed)
        return self._fit_all_statistics(X, y, known, X_calibration)

    def _fit_all_statistics(self, X: np.ndarray, y: np.ndarray, known: np.ndarray,
                            X_calibration: np.ndarray | None) -> Detector:
        """Everything `fit` does after training: the statistics on the training normals, the limit on the
        held-out known normals (and `X_calibration`), and under `t2_trim: auto` the trim from the estimated
        share of defects hidden among the presumed normals."""
        cfg = self.config
        # fit's split exactly: it is the first draw of a generator seeded with the config's seed there too
        cal_idx, train_idx = self._split_normals(y, known, np.random.default_rng(cfg.seed))
        self.calibration_idx_ = cal_idx  # into X: the known normals held out of training for the limit
        heldout = X[cal_idx]
        if X_calibration is not None and len(X_calibration):
            heldout = np.concatenate([heldout, check_images(X_calibration, cfg.input_size)])
        auto = cfg.t2_trim == "auto"
        self.fit_statistics(X[train_idx], heldout, trim=0.0 if auto else cfg.t2_trim, known=known[train_idx])
        self.contamination_ = None
        if auto:
            self._trim_hidden_defects(X, train_idx[~known[train_idx]], heldout, X[y == 1], train_idx, known)
        if self.limit_.method != "calibrated" and cfg.threshold == "calibrated":
            log.warning("%s", self.limit_.describe())
        return self

    def _trim_hidden_defects(self, X: np.ndarray, presumed_idx: np.ndarray, heldout: np.ndarray,
                             X_defects: np.ndarray, train_idx: np.ndarray, known: np.ndarray) -> None:
        """`t2_trim: auto`: estimate the share of defects among the presumed normals from the untrimmed fit's
        scores (scoring.estimate_contamination: the known normals place a cut, the confirmed defects say how
        many defects pass it), then refit the statistics without that many of the highest-scored codes."""
        score = lambda A: self.score(A, maps=False).score if len(A) else np.empty(0)  # noqa: E731
        self.contamination_ = estimate_contamination(score(X[presumed_idx]), score(heldout), score(X_defects))
        log.info("t2_trim auto: %s", self.contamination_.describe())
        # The estimate is a share of the presumed normals; the trim is a share of all the training normals.
        trim = min(self.contamination_.share, MAX_TRIM) * len(presumed_idx) / len(train_idx)
        if trim > 0:
            self.fit_statistics(X[train_idx], heldout, trim=trim, known=known[train_idx])

    def fit_statistics(self, X_normal: np.ndarray, X_heldout: np.ndarray | None = None,
                       trim: float | None = None, known: np.ndarray | None = None) -> Detector:
        """(Re)fit T2's means and covariances on these normals (at most the family's `stats_images` of them),
        the combined score's scales, and the primary score's limit: calibrated on held-out normals if asked
        (and there are enough), else the F limit (global T2) or the training quantile (any other score).
        `trim`: the share of the highest-T2 codes left out (default: the config's `t2_trim`, or under "auto"
        the share this detector was fitted with, `t2_trim_`). `known`: which of X_normal are known to be good
        (default: all); the combined score's scales come from them when there are enough."""
        cfg = self.config
        if trim is None:
            trim = cfg.t2_trim if cfg.t2_trim != "auto" else getattr(self, "t2_trim_", 0.0)
        self.t2_trim_ = float(trim)
        self.primary_ = _primary(cfg, self.model_)
        known = np.ones(len(X_normal), dtype=bool) if known is None else np.asarray(known, dtype=bool)
        cap = self.model_.stats_images
        if cap is not None and len(X_normal) > cap:
            pick = np.sort(np.random.default_rng(cfg.seed).choice(len(X_normal), cap, replace=False))
            X_normal, known = X_normal[pick], known[pick]
        raw = self._forward(X_normal, features=True)  # one pass (one latent search): the statistics need it all
        self.hotelling_ = Hotelling.fit(raw.codes, alpha=cfg.alpha, trim=self.t2_trim_)
        self.local_ = None
        if raw.features is not None:
            self.local_, train_map = self._fit_local(raw, known)
            raw = replace(raw, t2_local=self.local_.image_score(train_map))
        train = self._raw_scores(raw)
        # Each scale is a (1 - alpha) quantile of the training normals' scores: of those known to be good where
        # there are enough, since a defect hidden among the presumed normals would set it otherwise (the local
        # score sees the small ones that T2's trim, ranked by the global code, leaves in).
        base = known if known.sum() >= needed_for_rank(cfg.alpha) else np.ones(len(known), dtype=bool)
        self.scales_ = {name: _positive(np.quantile(s[base], 1 - cfg.alpha)) for name, s in train.items()
                        if name in ("global", "local")}
        heldout = X_heldout if cfg.threshold == "calibrated" and X_heldout is not None and len(X_heldout) else None
        held = self._primary_of(self._raw_scores(self._forward(heldout, maps=False))) if heldout is not None else None
        self.limit_ = self._limit(self._primary_of(train), held)
        self.threshold_ = self.limit_.threshold
        return self

    def _fit_local(self, raw: _Raw, known: np.ndarray) -> tuple[LocalHotelling | LocalNearest, np.ndarray]:
        """The local statistics of the training normals' feature maps, and those normals' own local T2 maps
        (under `nearest`, each bank image's own codes left out of its search, as for a new normal)."""
        cfg, features = self.config, raw.features
        if cfg.local_stats != "nearest":
            local = LocalHotelling.fit(features, per_position=cfg.local_stats == "per_position", topk=cfg.local_topk)
            return local, local.t2_map(features)
        pick = self._bank(raw.codes, known)
        local = LocalNearest.fit(features[pick], reach=cfg.local_reach, topk=cfg.local_topk)
        own = np.full(len(features), -1)
        own[pick] = np.arange(len(pick))
        return local, local.t2_map(features, own=own)

    def _bank(self, codes: np.ndarray, known: np.ndarray) -> np.ndarray:
        """Which training normals lend their codes to the nearest-normal search: up to `local_bank` of those
        below the (1 - trim) quantile of the trimmed T2, the known-good ones first, topped up at random with
        presumed ones. A defect hidden among the presumed normals that sits in the bank is some defect's
        nearest normal and hides its kind; T2's trim, ranked by the global code, misses the small ones."""
        cfg = self.config
        t2 = self.hotelling_.t2(codes)
        below = t2 <= np.quantile(t2, 1 - self.t2_trim_) if self.t2_trim_ > 0 else np.ones(len(t2), dtype=bool)
        rng = np.random.default_rng(cfg.seed)
        good, presumed = np.flatnonzero(below & known), np.flatnonzero(below & ~known)
        pick = rng.choice(good, min(cfg.local_bank, len(good)), replace=False)
        top_up = rng.choice(presumed, min(cfg.local_bank - len(pick), len(presumed)), replace=False)
        return np.sort(np.concatenate([pick, top_up]).astype(int))

    def _split_normals(self, y: np.ndarray, known: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(held-out, training) indices: a `calibration_fraction` of the known normals never trains the model;
        the presumed normals all train it and never calibrate it."""
        known_idx = rng.permutation(np.flatnonzero((y != 1) & known))
        n_cal = round(self.config.calibration_fraction * len(known_idx))
        train_idx = np.sort(np.concatenate([known_idx[n_cal:], np.flatnonzero((y != 1) & ~known)]))
        return np.sort(known_idx[:n_cal]), train_idx

    def rescored(self, X: np.ndarray, y: np.ndarray | None = None, known: np.ndarray | None = None, *,
                 X_calibration: np.ndarray | None = None, **config: Any) -> Detector:
        """A copy of this fitted detector, its statistics and limit refitted as `fit` would on (X, y, known,
        X_calibration) with these config fields changed (`score="global"`, `t2_trim=0.1`, ...): the same
        network, not trained again. For comparing scores, or labels' effect on the statistics (the same
        normals with other confirmed defects: `t2_trim: auto`'s estimate), without retraining."""
        other = Detector(self.config.model_copy(update=config))
        other.model_, other.history_ = self.model_, self.history_
        other.n_train_, other.n_defects_mixed_ = self.n_train_, self.n_defects_mixed_
        other.primary_ = _primary(other.config, other.model_)
        y = np.zeros(len(X), dtype=np.int8) if y is None else np.asarray(y)
        known = np.ones(len(X), dtype=bool) if known is None else np.asarray(known, dtype=bool)
        return other._fit_all_statistics(check_images(X, other.config.input_size), y, known, X_calibration)

    def calibrate(self, X_known_normal: np.ndarray) -> Detector:
        """Re-set the primary score's limit and p-values from these normals, known to be good and never trained
        on (new labels: `aae-ray recalibrate`), without touching the weights or T2's statistics. Too few of them
        for the rank at alpha: the F limit for the global T2; any other score keeps its current limit."""
        cfg, hot = self.config, self.hotelling_
        if cfg.threshold == "f_ucl" and self.primary_ == "global":
            return self  # asked for the F limit: no normals change it
        X = check_images(X_known_normal, cfg.input_size)
        held = self.score(X, maps=False).score if len(X) else None
        n_held = 0 if held is None else len(held)
        if n_held >= needed_for_rank(cfg.alpha):
            self.limit_ = ScoreLimit.fit(held, held, cfg.alpha).with_f(hot)  # the held-out rule applies: calibrated
        elif self.primary_ == "global":
            self.limit_ = replace(ScoreLimit.f_limit(hot), n_heldout=n_held)
        else:
            self.limit_ = replace(self.limit_, n_heldout=n_held)
        self.threshold_ = self.limit_.threshold
        return self

    def _limit(self, train: np.ndarray, held: np.ndarray | None) -> ScoreLimit:
        cfg, hot = self.config, self.hotelling_
        n_held = 0 if held is None else len(held)
        if self.primary_ == "global":
            if cfg.threshold == "f_ucl":
                return replace(ScoreLimit.f_limit(hot), n_heldout=n_held)
            limit = ScoreLimit.fit(train, held, cfg.alpha) if held is not None else None
            # Too few held-out normals for the conformal rank: the F limit, not the optimistic training quantile
            if limit is not None and limit.method == "calibrated":
                return limit.with_f(hot)
            return replace(ScoreLimit.f_limit(hot), n_heldout=n_held)
        # The training normals may hide defects (presumed normals): their top t2_trim share is left out
        return ScoreLimit.fit(train, held, cfg.alpha, trim=self.t2_trim_).with_f(hot)

    @property
    def score_label(self) -> str:
        """What the primary score is called on a page: "T²", "local T²", "combined T²" or "<family> score"."""
        return SCORE_LABELS.get(self.primary_, f"{self.config.family} score")

    @property
    def map_label(self) -> str:
        """What the anomaly map shows."""
        return "local T²" if self.local_ is not None and self.config.anomaly_map == "local" else "reconstruction error"

    # --- inference ----------------------------------------------------------------------------------------

    def score(self, X: np.ndarray, *, maps: bool = True) -> Scores:
        """Everything from one forward pass (one latent search for AnoGAN); `maps=False` leaves out the
        per-pixel maps and reconstructions (pool scoring needs only the numbers)."""
        raw = self._forward(X, maps=maps)
        parts = self._raw_scores(raw)
        primary = self._primary_of(parts)
        t2_local = parts.get("local", np.full(len(raw.codes), np.nan))
        return Scores(primary, parts["global"], t2_local, self.limit_.p_value(primary), primary > self.threshold_,
                      raw.recon_error, raw.codes, raw.maps, raw.x_hat)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """The primary score of each image."""
        return self.score(X, maps=False).score

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)

    def encode(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m.codes(xb))

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, lambda m, xb: m.inference(xb).x_hat)

    def reconstruction_error(self, X: np.ndarray) -> np.ndarray:
        return self._forward(X, maps=False).recon_error

    def anomaly_map(self, X: np.ndarray) -> np.ndarray:
        """(N, S, S): the local T2 map laid over the image (config `anomaly_map: local`, where the family has
        one), or the per-pixel squared reconstruction error."""
        return self._forward(X, maps=True).maps

    def to(self, device: str | torch.device) -> Detector:
        """Run inference on this device (a loaded artifact starts on the CPU)."""
        place(self.model_, torch.device(device))
        return self

    # --- the one pass -------------------------------------------------------------------------------------

    def _forward(self, X: np.ndarray, *, maps: bool = False, features: bool = False) -> _Raw:
        """`features`: keep the local feature maps instead of scoring them (fitting: no statistics yet)."""
        X = check_images(X, self.config.input_size)
        local = None if features else self.local_
        use_local_map = local is not None and self.config.anomaly_map == "local"
        parts: dict[str, list[np.ndarray]] = {}
        device = _device(self.model_)
        model = place(self.model_, device).eval()
        batches = range(0, len(X), INFER_BATCH) if len(X) else [0]
        with torch.no_grad():  # not inference_mode: AnoGAN's latent search needs autograd inside
            for i in batches:
                xb = to_batch(torch.from_numpy(X[i : i + INFER_BATCH] if len(X) else X[:0]), device)
                if not len(xb):  # one blank image gives the shapes; none of it is kept
                    xb = torch.zeros((1, *X.shape[1:]), device=device)
                out = model.inference(xb)
                err = (out.x_hat - xb).pow(2)
                got = {"codes": out.codes, "recon": err.flatten(1).mean(1)}
                if out.score is not None:
                    got["native"] = out.score
                if features and out.local is not None:
                    got["features"] = out.local
                if local is not None and out.local is not None:
                    t2_map = local.t2_map(out.local.cpu().numpy())
                    got["local"] = local.image_score(t2_map)
                    if maps and use_local_map:
                        got["maps"] = model.local_to_image(torch.from_numpy(t2_map).float(), X.shape[-1])
                if maps:
                    got["x_hat"] = out.x_hat
                    if not use_local_map:
                        got["maps"] = err[:, 0]
                for k, v in got.items():
                    v = v.detach().cpu().numpy() if torch.is_tensor(v) else v
                    parts.setdefault(k, []).append(v[: len(X)])
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        return _Raw(cat["codes"], cat.get("native"), cat["recon"], cat.get("local"), cat.get("maps"),
                    cat.get("x_hat"), cat.get("features"))

    def _raw_scores(self, raw: _Raw) -> dict[str, np.ndarray]:
        parts = {"global": self.hotelling_.t2(raw.codes)}
        if raw.t2_local is not None:
            parts["local"] = raw.t2_local.astype(np.float64)
        if raw.native is not None:
            parts["native"] = raw.native.astype(np.float64)
        return parts

    def _primary_of(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        if self.primary_ == "combined":
            return np.maximum(parts["global"] / self.scales_["global"], parts["local"] / self.scales_["local"])
        return parts[self.primary_]

    def _run(self, X: np.ndarray, fn) -> np.ndarray:
        X = check_images(X, self.config.input_size)
        device = _device(self.model_)
        model = place(self.model_, device).eval()
        with torch.no_grad():
            if len(X) == 0:  # run one blank image to learn the output's shape, keep none of it
                return fn(model, torch.zeros((1, *X.shape[1:]), device=device)).cpu().numpy()[:0]
            outs = [fn(model, to_batch(torch.from_numpy(X[i : i + INFER_BATCH]), device)).cpu().numpy()
                    for i in range(0, len(X), INFER_BATCH)]
        return np.concatenate(outs)


def _primary(cfg: AAEConfig, model: torch.nn.Module) -> str:
    """The primary score's name; a config asking for a score the family cannot give is refused here."""
    primary = model.default_score if cfg.score == "auto" else cfg.score
    if primary in ("local", "combined") and not model.has_local:
        raise ValueError(f"score: {primary} needs a local map, and family {cfg.family!r} has none here "
                         "(the aae with local_depth >= 1, or patch)")
    if primary == "native" and not model.native_score:
        raise ValueError(f"score: native: family {cfg.family!r} has no native score; it scores by T2")
    return primary


def _positive(q: float) -> float:
    return float(q) if q > 0 else 1.0  # a scale of 0 (every normal scored 0) would divide by zero


def _device(model: torch.nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def check_images(X: np.ndarray, size: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1:] != (1, size, size):
        raise ValueError(f"expected images of shape (N, 1, {size}, {size}), got {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size and not (np.isfinite(X).all() and X.min() >= 0.0 and X.max() <= 1.0):
        raise ValueError("expected finite pixel values in [0, 1] (see aae_ray.data.images.to_model_input)")
    return X

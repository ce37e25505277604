"""The one model/training config, validated once at the edge (CLI, YAML, Tune trial, artifact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the problem."""


class AAEConfig(BaseModel):
    """Everything the source research varied, plus how we train and threshold. Frozen: build a new one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The model family (aae_ray.models.FAMILIES). aae scores by Hotelling's T2 of its latent, global and local;
    # patch is the training-free yardstick: a Gaussian over k x k pixel patches; the source research's comparison
    # methods score natively: ae reconstruction error, vae negative ELBO, deepsad the distance to its centre,
    # egbad and anogan the residual + discriminator-feature loss.
    family: Literal["aae", "patch", "ae", "vae", "deepsad", "egbad", "anogan"] = "aae"
    # Which score is primary (what p_value, threshold and anomaly refer to). auto: the family's own choice
    # (aae: combined when it has a local latent, else global; patch: local; the others: native).
    # combined = max(t2 / q_global, t2_local / q_local), each scaled by its (1 - alpha) quantile on the training
    # normals: an image passes the combined limit when either score is far out in its own tail, so neither a
    # whole-object anomaly (global) nor a small local defect (local) is lost (README: "The model and the score").
    score: Literal["auto", "global", "local", "combined", "native"] = "auto"
    # The AAE's spatial latent: a local_dim-channel code at every position of the encoder's feature map after
    # local_depth conv blocks (0 = none), pushed to N(0, I) per position by a 1x1-conv discriminator, and fed
    # to the decoder at the mirror depth (skipped at random with local_skip_drop, so the global code must still
    # reconstruct alone). Hotelling's T2 per position gives the local map.
    local_depth: int = Field(1, ge=0, le=5)
    local_dim: int = Field(32, ge=1, le=256)
    local_kernel: int = Field(3, ge=1, le=7)  # the local head's conv over the feature map: its reach in cells
    local_skip_drop: float = Field(0.5, ge=0, le=1)
    # Local T2's statistics: one mean and covariance per position (aligned parts), one shared (textures), or
    # nearest: each position's distance to the nearest normal code up to local_reach cells away, among the
    # codes of local_bank training normals (parts that move a little; scoring.LocalNearest).
    local_stats: Literal["per_position", "shared", "nearest"] = "per_position"
    local_reach: int = Field(1, ge=0, le=8)
    local_bank: int = Field(300, ge=2, le=20_000)
    local_topk: int = Field(1, ge=1, le=256)  # the image's local score: mean of its top-k positions (1 = max)
    anomaly_map: Literal["local", "recon"] = "local"  # the heat map: local T2 upsampled, or reconstruction error
    patch_size: int = Field(8, ge=2, le=64)  # patch: k x k pixel patches ...
    patch_stride: int = Field(2, ge=1, le=64)  # ... every `patch_stride` pixels
    input_size: Literal[32, 64, 128] = 32  # 32x32 worked best for solder joints
    conv_blocks: int = Field(3, ge=2, le=5)  # conv, norm, LeakyReLU, stride 2; 3 worked best
    base_channels: int = Field(32, ge=4, le=128)  # channels of the first block, doubled per block
    latent_dim: int = Field(32, ge=2, le=128)  # the research needed >= ~12; 32 beat 16 on Fashion-MNIST
    fc_units: int = Field(256, ge=0, le=4096)  # hidden FC layer between conv features and latent; 0 = none
    # BatchNorm (no affine) on the codes: each dimension's mean and variance match the prior's by design, so
    # the discriminator only has to shape the rest (T2 AUROC on Fashion-MNIST class 0: 0.911 -> 0.936).
    latent_norm: bool = True
    disc_units: int = Field(256, ge=8, le=4096)  # width of the latent discriminator's two hidden layers
    lr: float = Field(1e-3, gt=0, le=1e-1)  # reconstruction step (encoder + decoder)
    lr_adv: float = Field(1e-3, gt=0, le=1e-1)  # discriminator and generator steps
    adv_weight: float = Field(1.0, ge=0, le=100)
    disc_steps: int = Field(2, ge=1, le=10)  # a stronger discriminator fits the prior better (ENVIRONMENT.md)
    weight_decay: float = Field(0.0, ge=0, le=1e-1)
    # Confirmed defects in training. anomaly_ratio: the share of the training set they make up (repeated or
    # subsampled to it; 0: none of them; "all": each once). defect_loss "push" (Deep SAD-style, Ruff et al.
    # 2020): they are not reconstructed, and their global code is pushed away from the prior's centre, so their
    # T2 is driven up. On the Deep SAD protocol (bench/results/labels.md, deepsad_gain, one seed so far) push
    # raised the labeled kind's AUROC 0.873 -> 0.951 and left the unseen kinds' as they were (0.897 -> 0.900).
    # "none" is the source research's mixing, defects trained as
    # normals: give it a small share (0.005 was best on its solder joints; on Fashion-MNIST mixing lowered AUROC,
    # bench/results/fmnist_methods.md), since "all" would then train every confirmed defect as a normal image.
    # A family that cannot treat defects apart (VAE, EGBAD, AnoGAN) gets none of them under "all".
    anomaly_ratio: float | Literal["all"] = "all"
    defect_loss: Literal["none", "push"] = "push"
    push_weight: float = Field(1.0, ge=0, le=100)
    # Deep SAD (Ruff et al. 2020): weight of the labeled defects' inverse-distance term (eta in eq. 4), the
    # autoencoder pretraining epochs, counted within `epochs` (at least one Deep SAD epoch always runs), and the
    # step after pretraining: the paper's 1e-4. At `lr` (1e-3) the codes collapsed onto c within two epochs and
    # Fashion-MNIST AUROC fell to 0.17-0.35 on polluted classes 5 and 0; at 1e-4, 0.69 and 0.67.
    eta: float = Field(1.0, ge=0, le=100)
    pretrain_epochs: int = Field(5, ge=0, le=1000)
    sad_lr: float = Field(1e-4, gt=0, le=1e-1)
    vae_score: Literal["elbo", "recon"] = "elbo"  # vae: negative ELBO at the posterior mean, or its recon error
    # AnoGAN (Schlegl et al. 2017): Adam steps of the latent search that scores each image; its cost is linear
    # in them (bench/README.md: "Which model when"). The paper used 500; 50 keeps serving usable.
    anogan_steps: int = Field(50, ge=1, le=5000)
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=2, le=8192)
    seed: int = 0
    # Share of the highest-T2 training codes left out of T2's mean and covariance. Set it near the share of
    # defects expected among the presumed normals: on Fashion-MNIST with 10% pollution, 0.2 lifted the mean T2
    # AUROC from 0.89 to 0.93 (bench/results/fmnist_deepsad_trim0.2.md); on clean data it cost 0.005-0.02.
    # auto: that share estimated after training, from the known normals held out and the confirmed defects
    # (scoring.estimate_contamination); 0 when every normal is known to be good.
    t2_trim: float | Literal["auto"] = "auto"
    alpha: float = Field(0.01, gt=0, lt=0.5)  # false-alarm rate the T2 threshold is set for
    calibration_fraction: float = Field(0.2, ge=0, lt=0.5)  # normals held out of training for the threshold
    threshold: Literal["calibrated", "f_ucl"] = "calibrated"  # conformal on held-out normals, or the F limit
    num_threads: int = Field(0, ge=0, le=256)  # torch CPU threads; 0 = leave torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when torch sees one (a Tune trial: its share)

    @model_validator(mode="after")
    def _fits_input(self) -> AAEConfig:
        if self.t2_trim != "auto" and not 0 <= self.t2_trim < 0.5:
            raise ValueError(f"t2_trim must be auto or a share in [0, 0.5), got {self.t2_trim}")
        if self.anomaly_ratio != "all" and not 0 <= self.anomaly_ratio < 0.5:
            raise ValueError(f"anomaly_ratio must be all or a share in [0, 0.5), got {self.anomaly_ratio}")
        if self.input_size >> self.conv_blocks < 1:
            msg = f"conv_blocks={self.conv_blocks} halves input_size={self.input_size} below 1 pixel"
            raise ValueError(msg)
        if self.family == "aae" and self.local_depth > self.conv_blocks:
            raise ValueError(f"local_depth={self.local_depth} is deeper than conv_blocks={self.conv_blocks}")
        if self.local_kernel % 2 == 0:
            raise ValueError(f"local_kernel must be odd (a centred window), got {self.local_kernel}")
        if self.family == "patch" and self.patch_size > self.input_size:
            raise ValueError(f"patch_size={self.patch_size} is larger than input_size={self.input_size}")
        return self


def load_config(path: Path | None = None, overrides: list[str] | None = None, **fixed: Any) -> AAEConfig:
    """Defaults <- YAML file <- keyword fields <- `key=value` overrides, validated once."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(path))
    values.update(fixed)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    return validate(values, where=str(path) if path else "config")


def validate(values: dict[str, Any], where: str = "config") -> AAEConfig:
    try:
        return AAEConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        allowed = ", ".join(sorted(AAEConfig.model_fields)) if err["type"] == "extra_forbidden" else ""
        hint = f" (known keys: {allowed})" if allowed else ""
        raise ConfigError(f"{where}: {key}: {err['msg']}{hint}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data

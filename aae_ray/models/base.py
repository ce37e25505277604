"""What every model family offers the training loop and the Detector: one small contract (PyOD's shape).

    model.configure_optimizers() -> {name: optimizer}
    model.train_step(xb, defect_b, optimizers) -> {loss name: float}   one minibatch, all of its steps
    model.start_epoch(epoch, x_normal)                                  a phase change between epochs (Deep SAD)
    model.codes(x) -> (B, p)                                            the latent Hotelling's T2 is fitted on
    model.inference(x) -> Inference(codes, x_hat, score, local)         everything scoring needs, in one pass
    model.local_to_image(t2_map, size) -> (B, S, S)                     a local T2 map laid over the image

`score` is the family's native anomaly score (B,), higher = more abnormal, or None where the family scores by
T2 of its codes (the AAE). `local` is a feature map (B, d, h, w) whose per-position T2 is the local score, or
None where the family has none. `forward(x)` returns (codes, x_hat) and is what precise BatchNorm runs
(training_loop.py). A family with `trainable = False` (patch) is fitted by `fit_normals` instead of the training loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

GRAD_CLIP = 5.0  # keeps an occasional huge push/adversarial gradient from blowing up the weights


class Inference(NamedTuple):
    codes: torch.Tensor  # (B, p)
    x_hat: torch.Tensor  # (B, 1, S, S)
    score: torch.Tensor | None = None  # (B,) the native score
    local: torch.Tensor | None = None  # (B, d, h, w) the features local T2 is computed on


class FamilyModel(nn.Module):
    trainable = True  # False: no training loop; `fit_normals` fits the model's buffers (patch)
    precise_bn = True  # recompute BatchNorm statistics on the training normals after training (training_loop.py)
    native_score = True  # False: `inference` gives no score; the Detector scores by T2 of the codes (AAE)
    adversarial = False
    pushes_defects = False  # the loss honours `defect_loss: push`: confirmed defects' codes pushed out of the prior
    stats_images: int | None = None  # fit T2 on at most this many training normals (a random draw): costly scorers

    @property
    def default_score(self) -> str:
        """The primary score when the config says `score: auto`."""
        return "native" if self.native_score else "global"

    @property
    def learns_from_defects(self) -> bool:
        """Whether training treats confirmed defects apart from normals (anomaly_ratio "all" trains them only then:
        a family that would reconstruct them as normals gets none)."""
        return self.pushes_defects and self.cfg.defect_loss == "push"

    @property
    def has_local(self) -> bool:
        """Whether `inference` gives a local feature map."""
        return False

    @property
    def code_dim(self) -> int:
        return self.cfg.latent_dim

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def inference(self, x: torch.Tensor) -> Inference:
        z, x_hat = self(x)
        return Inference(z, x_hat)

    def local_to_image(self, t2_map: torch.Tensor, size: int) -> torch.Tensor:
        """(B, h, w) -> (B, S, S): each position's T2 spread over the pixels it stands for (bilinear)."""
        return F.interpolate(t2_map[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    def fit_normals(self, x_normal: torch.Tensor) -> None:
        """Fit a non-trainable family on the training normals."""

    def start_epoch(self, epoch: int, x_normal: torch.Tensor) -> None:
        """Called before each epoch (1-based) with the training normals; most families need nothing."""


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One clipped optimizer step on `loss`, over this optimizer's parameters only."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()


def per_image_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).flatten(1).mean(1)  # (B,)

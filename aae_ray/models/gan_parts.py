"""Networks and losses the two GAN families share (EGBAD, AnoGAN).

The discriminators have no BatchNorm: real and generated images pass through them in separate batches, and
BatchNorm's batch statistics would let them tell the batches apart instead of the images (Salimans et al.
2016, "virtual batch normalization", names the problem). Dropout regularises them instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models.backbone import block_channels

DROPOUT = 0.2
FEATURE_WEIGHT = 0.1  # lambda: the discriminator-feature share of the anomaly score (both papers' value)


class ImageFeatures(nn.Module):
    """(B, 1, S, S) -> (B, F): the backbone's conv blocks without BatchNorm, flattened."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in block_channels(cfg):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Dropout(DROPOUT)]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        side = cfg.input_size >> cfg.conv_blocks
        self.dim = c_in * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def real(logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def fake(logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def residual_score(x: torch.Tensor, x_hat: torch.Tensor, f_x: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    """(B,): (1 - lambda) * L1 residual + lambda * L1 distance of discriminator features (Schlegl et al. 2017,
    eq. 5; Zenati et al. 2018, eq. 4 with the feature-matching discriminator loss)."""
    residual = (x - x_hat).abs().flatten(1).sum(1)
    feature = (f_x - f_hat).abs().flatten(1).sum(1)
    return (1 - FEATURE_WEIGHT) * residual + FEATURE_WEIGHT * feature

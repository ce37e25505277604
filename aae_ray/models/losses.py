"""Losses shared by the autoencoder families. Each takes a mask so defects can be treated apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3


def reconstruction(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the images selected by `mask` (B,) bool."""
    per_image = (x_hat - x).pow(2).flatten(1).mean(1)  # (B,)
    return masked_mean(per_image, mask)


def push(z: torch.Tensor, defect: torch.Tensor) -> torch.Tensor:
    """Deep SAD's inverse distance for labeled anomalies: small when a defect's code is far from the
    prior's centre, so its T2 is driven up (Ruff et al. 2020, eq. 4). ||z||^2 / p is T2 under N(0, I)."""
    dist = z.pow(2).mean(1)  # (B,)
    return masked_mean(1.0 / (dist + EPS), defect)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return values.sum() * 0.0  # keeps the graph and the dtype when a batch has no such image
    return values[mask].mean()


def discriminator(d_prior: torch.Tensor, d_codes: torch.Tensor) -> torch.Tensor:
    """The discriminator calls prior samples real (1) and encoder codes fake (0)."""
    real = F.binary_cross_entropy_with_logits(d_prior, torch.ones_like(d_prior))
    fake = F.binary_cross_entropy_with_logits(d_codes, torch.zeros_like(d_codes))
    return real + fake


def generator(d_codes: torch.Tensor) -> torch.Tensor:
    """The encoder wants its codes called real."""
    return F.binary_cross_entropy_with_logits(d_codes, torch.ones_like(d_codes))


def autoencoder(
    z: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor, defect: torch.Tensor, *, defect_loss: str,
    push_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reconstruction step's objective. With "none" (the source research's method) confirmed defects
    are ordinary training images; with "push" they are not reconstructed but pushed out of the prior."""
    if defect_loss == "push":
        rec = reconstruction(x_hat, x, ~defect)
        psh = push(z, defect)
        return rec + push_weight * psh, {"rec": rec.item(), "push": psh.item()}
    rec = reconstruction(x_hat, x, torch.ones_like(defect))
    return rec, {"rec": rec.item()}

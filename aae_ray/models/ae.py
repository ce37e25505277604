"""The plain autoencoder on the same backbone: the source research's baseline (no prior on the latent)."""

from __future__ import annotations

import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models import losses
from aae_ray.models.backbone import Decoder, Encoder


class Autoencoder(nn.Module):
    adversarial = False

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)  # (B, p)
        return z, self.decoder(z)  # (B, p), (B, 1, S, S)

    def reconstruction_loss(self, x: torch.Tensor, defect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Step 1. Returns the loss, the detached codes (for the discriminator step) and named losses."""
        z, x_hat = self(x)
        loss, logs = losses.autoencoder(z, x_hat, x, defect, defect_loss=self.cfg.defect_loss,
                                        push_weight=self.cfg.push_weight)
        return loss, z.detach(), logs

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = self.parameters()
        return {"rec": torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)}

"""The plain autoencoder on the same backbone: the source research's baseline (no prior on the latent).

Native score: the mean squared reconstruction error per image. T2 on its codes is reported apart (`t2`)."""

from __future__ import annotations

import torch

from aae_ray.config import AAEConfig
from aae_ray.models import losses
from aae_ray.models.backbone import Decoder, Encoder
from aae_ray.models.base import FamilyModel, Inference, per_image_mse, step


class Autoencoder(FamilyModel):
    pushes_defects = True

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

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        loss, _, logs = self.reconstruction_loss(xb, db)
        step(opt["rec"], loss)
        return logs

    def inference(self, x: torch.Tensor) -> Inference:
        z, x_hat = self(x)
        return Inference(z, x_hat, per_image_mse(x_hat, x))

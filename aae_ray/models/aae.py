"""Adversarial Autoencoder (Makhzani et al. 2015, arXiv:1511.05644) with a N(0, I) prior on the latent.

The discriminator sees latent codes, not images: it tells samples of the prior from encoder outputs, and
the encoder learns to fool it, so normal images land in a standard normal where Hotelling's T2 applies.
"""

from __future__ import annotations

import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models import losses
from aae_ray.models.backbone import Decoder, Encoder
from aae_ray.models.base import FamilyModel, step


class LatentDiscriminator(nn.Module):
    """(B, latent_dim) -> (B,) logits: high for prior samples, low for encoder codes."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        h = cfg.disc_units
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim, h), nn.LeakyReLU(0.2),
            nn.Linear(h, h), nn.LeakyReLU(0.2),
            nn.Linear(h, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


class AdversarialAutoencoder(FamilyModel):
    """Scores by Hotelling's T2 of its codes (the Detector's default: `inference` returns no native score)."""

    adversarial = True
    native_score = False

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.discriminator = LatentDiscriminator(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)  # (B, p)
        return z, self.decoder(z)  # (B, p), (B, 1, S, S)

    def sample_prior(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, device=like.device, dtype=like.dtype)

    def reconstruction_loss(self, x: torch.Tensor, defect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Step 1. Returns the loss, the detached codes (for the discriminator step) and named losses."""
        z, x_hat = self(x)
        loss, logs = losses.autoencoder(z, x_hat, x, defect, defect_loss=self.cfg.defect_loss,
                                        push_weight=self.cfg.push_weight)
        return loss, z.detach(), logs

    def discriminator_loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Step 2, on detached codes."""
        prior = self.sample_prior(codes.shape[0], codes)
        return losses.discriminator(self.discriminator(prior), self.discriminator(codes))

    def generator_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Step 3: the encoder alone, trained to make the discriminator call its codes prior samples."""
        return losses.generator(self.discriminator(self.encoder(x)))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        autoencoder = [*self.encoder.parameters(), *self.decoder.parameters()]
        # beta1 = 0.5 is the usual choice for adversarial steps (DCGAN); it damps oscillation.
        # Adam ignores a constant factor on a loss, so adv_weight scales the generator's step size instead.
        return {
            "rec": torch.optim.Adam(autoencoder, lr=cfg.lr, weight_decay=cfg.weight_decay),
            "disc": torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_adv, betas=(0.5, 0.999)),
            "gen": torch.optim.Adam(self.encoder.parameters(), lr=cfg.lr_adv * cfg.adv_weight, betas=(0.5, 0.999)),
        }

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Three steps in a fixed order (Makhzani et al. 2015, section 2)."""
        cfg = self.cfg
        # 1. reconstruction: encoder + decoder (and confirmed defects pushed out, if asked)
        loss, codes, logs = self.reconstruction_loss(xb, db)
        step(opt["rec"], loss)
        # Codes of confirmed defects stay out of the prior matching when they are pushed away from it.
        keep = ~db if cfg.defect_loss == "push" and bool(db.any()) else torch.ones_like(db)
        if not bool(keep.any()):  # a batch of only pushed defects has nothing to match to the prior
            return logs
        # 2. discriminator: prior samples vs this batch's (detached) codes
        for _ in range(cfg.disc_steps):
            d_loss = self.discriminator_loss(codes[keep])
            step(opt["disc"], d_loss)
        # 3. generator: the encoder alone tries to fool the discriminator
        g_loss = self.generator_loss(xb[keep])
        if cfg.adv_weight > 0:
            step(opt["gen"], g_loss)
        return {**logs, "disc": d_loss.item(), "gen": g_loss.item()}

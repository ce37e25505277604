"""Adversarial Autoencoder (Makhzani et al. 2015, arXiv:1511.05644) with a N(0, I) prior on the latent.

The discriminator sees latent codes, not images: it tells samples of the prior from encoder outputs, and
the encoder learns to fool it, so normal images land in a standard normal where Hotelling's T2 applies.

Defects are mostly local, and one global code averages a small void away. So the AAE also has a spatial
latent (config `local_depth`): a `local_dim`-channel code at every position of the encoder's feature map after
`local_depth` blocks, pushed to N(0, I) at each position by a 1x1-conv discriminator, and added back into the
decoder where it reaches the same size, so the local codes must carry what is there. The skip is dropped for a
random `local_skip_drop` of the images in each step, so the global code must still reconstruct on its own and
keeps what whole-object anomalies need. Hotelling's T2 per position of the local codes is the local map.
"""

from __future__ import annotations

import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models import losses
from aae_ray.models.backbone import Decoder, Encoder, block_channels
from aae_ray.models.base import FamilyModel, Inference, step

LOCAL_DISC_UNITS = 64  # the local discriminator sees one position's few channels: a narrow one suffices
LOCAL_DISC_SAMPLES = 4096  # positions a discriminator step sees: a random draw keeps its cost flat in size


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


class LocalDiscriminator(nn.Module):
    """(N, local_dim) codes of single positions -> (N,) logits: the latent discriminator, one position at a
    time (a 1x1 convolution over the map is the same network)."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        h = LOCAL_DISC_UNITS
        self.net = nn.Sequential(nn.Linear(cfg.local_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2),
                                 nn.Linear(h, 1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u).squeeze(1)


class AdversarialAutoencoder(FamilyModel):
    """Scores by Hotelling's T2 of its codes, global and local (`inference` returns no native score)."""

    adversarial = True
    native_score = False
    pushes_defects = True

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.discriminator = LatentDiscriminator(cfg)
        self.depth = cfg.local_depth
        if self.depth:
            c = block_channels(cfg)[self.depth - 1]
            k = cfg.local_kernel
            self.local_head = nn.Sequential(nn.Conv2d(c, cfg.local_dim, k, padding=k // 2),
                                            nn.BatchNorm2d(cfg.local_dim, affine=False))
            self.local_skip = nn.Conv2d(cfg.local_dim, c, 1)
            self.local_discriminator = LocalDiscriminator(cfg)

    @property
    def default_score(self) -> str:
        return "combined" if self.depth else "global"

    @property
    def has_local(self) -> bool:
        return bool(self.depth)

    @property
    def local_shape(self) -> tuple[int, int]:
        side = self.cfg.input_size >> self.depth
        return side, side

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global codes (B, p), local codes (B, local_dim, h, w) or None)."""
        if not self.depth:
            return self.encoder(x), None
        z, feat = self.encoder.features(x, self.depth)
        return z, self.local_head(feat)

    def decode(self, z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        if u is None:
            return self.decoder(z)
        skip = self.local_skip(u)
        drop = self.cfg.local_skip_drop
        if self.training and drop > 0:  # drop the skip for whole images; scale the rest to keep its mean
            keep = (torch.rand(len(u), 1, 1, 1, device=u.device) >= drop).to(skip.dtype)
            skip = skip * keep / max(1.0 - drop, 1e-6)
        return self.decoder(z, skip, self.depth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, u = self.encode(x)  # (B, p), (B, d, h, w)
        return z, self.decode(z, u)  # (B, p), (B, 1, S, S)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def inference(self, x: torch.Tensor) -> Inference:
        z, u = self.encode(x)
        return Inference(z, self.decode(z, u), None, u)

    def sample_prior(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, like.shape[1], device=like.device, dtype=like.dtype)

    def reconstruction_loss(self, x: torch.Tensor, defect: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """Step 1. Returns the loss, the detached codes (for the discriminator step) and named losses."""
        z, u = self.encode(x)
        x_hat = self.decode(z, u)
        loss, logs = losses.autoencoder(z, x_hat, x, defect, defect_loss=self.cfg.defect_loss,
                                        push_weight=self.cfg.push_weight)
        return loss, (z.detach(), None if u is None else u.detach()), logs

    def discriminator_loss(self, codes: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """Step 2, on detached codes: global, and local positions where the model has them."""
        prior = self.sample_prior(codes.shape[0], codes)
        loss = losses.discriminator(self.discriminator(prior), self.discriminator(codes))
        if local is not None:
            pos = _positions(local)
            loss = loss + losses.discriminator(self.local_discriminator(self.sample_prior(len(pos), pos)),
                                               self.local_discriminator(pos))
        return loss

    def generator_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Step 3: the encoder alone, trained to make the discriminators call its codes prior samples."""
        z, u = self.encode(x)
        loss = losses.generator(self.discriminator(z))
        if u is not None:
            loss = loss + losses.generator(self.local_discriminator(_positions(u)))
        return loss

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        local = [*self.local_head.parameters(), *self.local_skip.parameters()] if self.depth else []
        autoencoder = [*self.encoder.parameters(), *self.decoder.parameters(), *local]
        discriminators = [*self.discriminator.parameters(),
                          *(self.local_discriminator.parameters() if self.depth else [])]
        generator = [*self.encoder.parameters(), *(self.local_head.parameters() if self.depth else [])]
        # beta1 = 0.5 is the usual choice for adversarial steps (DCGAN); it damps oscillation.
        # Adam ignores a constant factor on a loss, so adv_weight scales the generator's step size instead.
        return {
            "rec": torch.optim.Adam(autoencoder, lr=cfg.lr, weight_decay=cfg.weight_decay),
            "disc": torch.optim.Adam(discriminators, lr=cfg.lr_adv, betas=(0.5, 0.999)),
            "gen": torch.optim.Adam(generator, lr=cfg.lr_adv * cfg.adv_weight, betas=(0.5, 0.999)),
        }

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Three steps in a fixed order (Makhzani et al. 2015, section 2)."""
        cfg = self.cfg
        # 1. reconstruction: encoder + decoder (and confirmed defects pushed out, if asked)
        loss, (codes, local), logs = self.reconstruction_loss(xb, db)
        step(opt["rec"], loss)
        # Codes of confirmed defects stay out of the prior matching when they are pushed away from it.
        keep = ~db if cfg.defect_loss == "push" and bool(db.any()) else torch.ones_like(db)
        if not bool(keep.any()):  # a batch of only pushed defects has nothing to match to the prior
            return logs
        # 2. discriminator: prior samples vs this batch's (detached) codes
        for _ in range(cfg.disc_steps):
            d_loss = self.discriminator_loss(codes[keep], None if local is None else local[keep])
            step(opt["disc"], d_loss)
        # 3. generator: the encoder alone tries to fool the discriminator
        g_loss = self.generator_loss(xb[keep])
        if cfg.adv_weight > 0:
            step(opt["gen"], g_loss)
        return {**logs, "disc": d_loss.item(), "gen": g_loss.item()}


def _positions(u: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (N, d): a random draw of at most LOCAL_DISC_SAMPLES positions' codes."""
    flat = u.permute(0, 2, 3, 1).reshape(-1, u.shape[1])
    if len(flat) <= LOCAL_DISC_SAMPLES:
        return flat
    return flat[torch.randperm(len(flat), device=u.device)[:LOCAL_DISC_SAMPLES]]

"""AnoGAN (Schlegl et al. 2017, arXiv:1703.05921): a DCGAN of normal images, scored by searching its latent.

Training is a plain GAN: G maps z ~ N(0, I) to images, D tells them from the training images. There is no
encoder, so each image x is scored by a latent search (section 2.2): from z = 0 (the prior's mode, so a score
never depends on a random start or the batch), `anogan_steps` Adam steps minimise
    (1 - lambda) * ||x - G(z)||_1 + lambda * ||f(x) - f(G(z))||_1        (eq. 5, lambda = 0.1)
with f the discriminator's last conv features; the loss at z* is the score. Each image's search is its own
(the loss is summed over the batch and Adam works per coordinate), batched for speed. Its cost is
anogan_steps forward and backward passes of G and D an image: bench/README.md's "Which model when" has the seconds.
The "reconstruction" is G(z*) and T2 is fitted on z*.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from aae_ray.config import AAEConfig
from aae_ray.models import gan_parts as gp
from aae_ray.models.backbone import Decoder
from aae_ray.models.base import FamilyModel, Inference, step

SEARCH_LR = 0.1  # Adam's step on z in the latent search


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Weights that need no gradient for a while: the search then records no graph for them (~1.3x faster)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class ImageDiscriminator(nn.Module):
    """x -> (logits (B,), features (B, F))."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.features = gp.ImageFeatures(cfg)
        self.head = nn.Linear(self.features.dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)  # (B, F)
        return self.head(f).squeeze(1), f


class AnoGAN(FamilyModel):
    precise_bn = False  # G trains on prior samples: its running statistics are those of G(z), keep them
    adversarial = True
    # Every code is a search (20 ms an image at 50 steps on 2 threads, bench/families.py --cost-only): 2,000
    # normals pin a 32-dim mean and covariance in about 40 s, where a Fashion-MNIST class's 6,000 take 2 minutes.
    stats_images = 2000

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = Decoder(cfg)
        self.discriminator = ImageDiscriminator(cfg)

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        z = torch.randn(len(xb), self.cfg.latent_dim, device=xb.device)
        for _ in range(self.cfg.disc_steps):
            with torch.no_grad():
                gz = self.generator(z)
            d_loss = gp.real(self.discriminator(xb)[0]) + gp.fake(self.discriminator(gz)[0])
            step(opt["disc"], d_loss)
        g_loss = gp.real(self.discriminator(self.generator(z))[0])  # non-saturating generator loss
        step(opt["gen"], g_loss)
        return {"disc": d_loss.item(), "gen": g_loss.item()}

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latent search: (z* (B, p), G(z*) (B, 1, S, S), score (B,)). Gradients reach z only."""
        with torch.enable_grad(), frozen(self):  # the Detector scores under no_grad
            z = torch.zeros(len(x), self.cfg.latent_dim, device=x.device, requires_grad=True)
            opt = torch.optim.Adam([z], lr=SEARCH_LR)
            f_x = self.discriminator(x)[1].detach()
            for _ in range(self.cfg.anogan_steps):
                loss = self._search_loss(x, f_x, z).sum()
                (grad,) = torch.autograd.grad(loss, z)
                z.grad = grad
                opt.step()
        z = z.detach()
        with torch.no_grad():
            x_hat = self.generator(z)
            return z, x_hat, gp.residual_score(x, x_hat, f_x, self.discriminator(x_hat)[1])

    def _search_loss(self, x: torch.Tensor, f_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x_hat = self.generator(z)
        return gp.residual_score(x, x_hat, f_x, self.discriminator(x_hat)[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, x_hat, _ = self.search(x)
        return z, x_hat

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.search(x)[0]

    def inference(self, x: torch.Tensor) -> Inference:
        return Inference(*self.search(x))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        return {"disc": torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_adv, betas=(0.5, 0.999)),
                "gen": torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_adv, betas=(0.5, 0.999))}

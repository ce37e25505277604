"""Deep SAD (Ruff et al. 2020, arXiv:1906.02694): a bias-free encoder maps normals close to a centre c.

Training, within `epochs`:
  1. the first `pretrain_epochs` (at most epochs - 1) train encoder + decoder as an autoencoder;
  2. c = the mean of the training normals' initial codes, entries within EPS_C of 0 pushed out to +-EPS_C
     (a zero entry lets the network reach c with zero weights);
  3. the encoder alone minimises, at `sad_lr`, per image (eq. 4):
        unlabeled (presumed normal):  ||phi(x) - c||^2
        confirmed defect:              eta * (||phi(x) - c||^2 + EPS)^-1
Native score: ||phi(x) - c||^2. The encoder has no bias and no BatchNorm shift or scale (section 3.1 of Ruff
et al. 2018): with them, mapping every image onto c is a trivial solution. T2 is fitted on phi(x).
The decoder only serves pretraining; after it, `reconstruct` shows what the pretrained decoder makes of phi(x).
"""

from __future__ import annotations

import torch

from aae_ray.config import AAEConfig
from aae_ray.models.backbone import Decoder, Encoder
from aae_ray.models.base import FamilyModel, Inference, per_image_mse, step

EPS = 1e-6  # in the labeled term's denominator (the reference implementation's value)
EPS_C = 0.1  # the smallest magnitude of a centre entry (ibid.)


class DeepSAD(FamilyModel):
    @property
    def learns_from_defects(self) -> bool:
        return True  # eta's inverse-distance term

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, latent_norm=False, bias=False)
        self.decoder = Decoder(cfg)
        self.register_buffer("c", torch.zeros(cfg.latent_dim))  # in the state dict, so artifacts keep it
        self.pretraining = cfg.pretrain_epochs > 0 and cfg.epochs > 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)  # (B, p)
        return z, self.decoder(z)

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.c).pow(2).sum(1)  # (B,)

    def start_epoch(self, epoch: int, x_normal: torch.Tensor) -> None:
        pretrain = min(self.cfg.pretrain_epochs, self.cfg.epochs - 1)
        if epoch == pretrain + 1:
            self.init_center(x_normal)
            self.pretraining = False

    @torch.no_grad()
    def init_center(self, x_normal: torch.Tensor) -> None:
        was_training = self.training
        self.eval()
        device = self.c.device
        z = torch.cat([self.encoder(xb.to(device)) for xb in x_normal.split(512)])
        c = z.mean(0)
        c[(c.abs() < EPS_C) & (c < 0)] = -EPS_C
        c[(c.abs() < EPS_C) & (c >= 0)] = EPS_C
        self.c.copy_(c)
        self.train(was_training)

    def sad_loss(self, z: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        dist = self.distance(z)
        per_image = torch.where(db, self.cfg.eta / (dist + EPS), dist)
        return per_image.mean()

    def train_step(self, xb: torch.Tensor, db: torch.Tensor, opt: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        if self.pretraining:  # the reference pretrains on all training images, labels unused
            z, x_hat = self(xb)
            loss = per_image_mse(x_hat, xb).mean()
            step(opt["pretrain"], loss)
            return {"rec": loss.item()}
        loss = self.sad_loss(self.encoder(xb), db)
        step(opt["sad"], loss)
        return {"sad": loss.item()}

    def inference(self, x: torch.Tensor) -> Inference:
        z, x_hat = self(x)
        return Inference(z, x_hat, self.distance(z))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        return {"pretrain": torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
                "sad": torch.optim.Adam(self.encoder.parameters(), lr=cfg.sad_lr, weight_decay=cfg.weight_decay)}

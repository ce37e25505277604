"""What every model family offers the training loop and the Detector: one small contract (PyOD's shape).

    model.configure_optimizers() -> {name: optimizer}
    model.train_step(xb, defect_b, optimizers) -> {loss name: float}   one minibatch, all of its steps
    model.start_epoch(epoch, x_normal)                                  a phase change between epochs (Deep SAD)
    model.codes(x) -> (B, p)                                            the latent Hotelling's T2 is fitted on
    model.inference(x) -> (codes, x_hat, score)                         everything scoring needs, in one pass

`score` is the family's native anomaly score (B,), higher = more abnormal, or None where the family scores by
T2 of its codes (the AAE). `forward(x)` returns (codes, x_hat) and is what precise BatchNorm runs (train.py).
"""

from __future__ import annotations

import torch
from torch import nn

GRAD_CLIP = 5.0  # keeps an occasional huge push/adversarial gradient from blowing up the weights


class FamilyModel(nn.Module):
    precise_bn = True  # recompute BatchNorm statistics on the training normals after training (train.py)
    native_score = True  # False: `inference` gives no score; the Detector scores by T2 of the codes (AAE)
    adversarial = False
    stats_images: int | None = None  # fit T2 on at most this many training normals (a random draw): costly scorers

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def inference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        z, x_hat = self(x)
        return z, x_hat, None

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

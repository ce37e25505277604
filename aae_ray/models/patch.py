"""The patch Gaussian: no network, Hotelling's T2 of raw k x k pixel patches. The honest yardstick.

Every `patch_stride` pixels a k x k patch is cut (torch's unfold); the Detector fits a Gaussian to the patches
of the training normals, per position or shared (config `local_stats`), and scores each position by its T2,
like the AAE's local latent but on pixels. Fitting takes seconds, so it is also an instant first model on a
new workspace. Its global code is the image averaged down to 4 x 4 (a coarse whole-object view, so `t2` is
defined as for every family), and its "reconstruction" is the mean training normal: it has no decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aae_ray.config import AAEConfig
from aae_ray.models.base import FamilyModel, Inference

CODE_GRID = 4  # the global code: the image averaged over a 4 x 4 grid, 16 numbers


class PatchGaussian(FamilyModel):
    trainable = False
    precise_bn = False
    native_score = False

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean_image", torch.zeros(1, 1, cfg.input_size, cfg.input_size))

    @property
    def default_score(self) -> str:
        return "local"

    @property
    def has_local(self) -> bool:
        return True

    @property
    def local_shape(self) -> tuple[int, int]:
        side = (self.cfg.input_size - self.cfg.patch_size) // self.cfg.patch_stride + 1
        return side, side

    @property
    def code_dim(self) -> int:
        return CODE_GRID * CODE_GRID

    def fit_normals(self, x_normal: torch.Tensor) -> None:
        self.mean_image.copy_(x_normal.mean(0, keepdim=True).to(self.mean_image.device))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, CODE_GRID).flatten(1)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, k * k, h, w): the patch at every position, pixels as channels."""
        k, s = self.cfg.patch_size, self.cfg.patch_stride
        side = (x.shape[-1] - k) // s + 1
        return F.unfold(x, k, stride=s).view(-1, k * k, side, side)  # -1, not len(x): an ONNX batch is free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(x), self.mean_image.expand_as(x)

    def inference(self, x: torch.Tensor) -> Inference:
        z, x_hat = self(x)
        return Inference(z, x_hat, None, self.patches(x))

    def local_to_image(self, t2_map: torch.Tensor, size: int) -> torch.Tensor:
        """Each pixel gets the mean T2 of the patches that cover it (exact, where bilinear would shift the map
        by up to half a patch: patch centres do not sit on the grid of a plain resize)."""
        k, s = self.cfg.patch_size, self.cfg.patch_stride
        cols = t2_map.flatten(1)[:, None, :].expand(-1, k * k, -1)  # (B, k*k, L): one T2 per patch pixel
        total = F.fold(cols, (size, size), k, stride=s)
        count = F.fold(torch.ones_like(cols[:1]), (size, size), k, stride=s)
        return (total / count.clamp(min=1))[:, 0]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

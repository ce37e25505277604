"""The conv encoder and its mirror decoder shared by every autoencoder family."""

from __future__ import annotations

import torch
from torch import nn

from aae_ray.config import AAEConfig

MAX_CHANNELS = 512


def block_channels(cfg: AAEConfig) -> list[int]:
    """Output channels of each conv block: base, 2*base, 4*base, ... capped."""
    return [min(cfg.base_channels * 2**i, MAX_CHANNELS) for i in range(cfg.conv_blocks)]


def _fc(n_in: int, n_out: int, hidden: int, bias: bool = True) -> nn.Sequential:
    if hidden == 0:
        return nn.Sequential(nn.Linear(n_in, n_out, bias=bias))
    return nn.Sequential(nn.Linear(n_in, hidden, bias=bias), nn.LeakyReLU(0.2), nn.Linear(hidden, n_out, bias=bias))


class Encoder(nn.Module):
    """(B, 1, S, S) -> (B, out_dim): conv blocks (conv, BatchNorm, LeakyReLU, stride 2) then FC.

    `out_dim` defaults to latent_dim (the VAE asks for 2x: mean and log-variance); `latent_norm` defaults to the
    config's; `bias=False` drops every bias and BatchNorm's affine shift, as Deep SAD needs (Ruff et al. 2018,
    section 3.1: a bias lets the network map everything onto the centre)."""

    def __init__(self, cfg: AAEConfig, *, out_dim: int | None = None, latent_norm: bool | None = None,
                 bias: bool = True):
        super().__init__()
        out_dim = cfg.latent_dim if out_dim is None else out_dim
        latent_norm = cfg.latent_norm if latent_norm is None else latent_norm
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in block_channels(cfg):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, affine=bias), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        side = cfg.input_size >> cfg.conv_blocks
        self.fc = _fc(c_in * side * side, out_dim, cfg.fc_units, bias=bias)
        self.norm = nn.BatchNorm1d(out_dim, affine=False) if latent_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(self.conv(x).flatten(1)))  # (B, latent_dim)

    def features(self, x: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (B, latent_dim), the feature map after `depth` conv blocks (B, C, S / 2^depth, S / 2^depth))."""
        h = x
        feat = x
        for i, layer in enumerate(self.conv):
            h = layer(h)
            if i == 3 * depth - 1:  # three layers a block: conv, norm, activation
                feat = h
        return self.norm(self.fc(h.flatten(1))), feat


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, 1, S, S) in [0, 1]: the encoder mirrored with transposed convs."""

    def __init__(self, cfg: AAEConfig):
        super().__init__()
        chans = block_channels(cfg)[::-1]
        self.side = cfg.input_size >> cfg.conv_blocks
        self.c0 = chans[0]
        self.fc = nn.Sequential(_fc(cfg.latent_dim, self.c0 * self.side**2, cfg.fc_units), nn.LeakyReLU(0.2))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:], strict=False):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        layers += [nn.ConvTranspose2d(chans[-1], 1, 4, stride=2, padding=1), nn.Sigmoid()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, skip: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
        """`skip` (B, C, S / 2^depth, S / 2^depth), if given, is added where the decoder reaches that size."""
        h = self.fc(z).view(-1, self.c0, self.side, self.side)  # (B, C, s, s)
        if skip is None:
            return self.deconv(h)  # (B, 1, S, S)
        at = 3 * (len(self.deconv) // 3 - depth + 1)  # layers before the mirror of encoder block `depth`
        return self.deconv[at:](self.deconv[:at](h) + skip)

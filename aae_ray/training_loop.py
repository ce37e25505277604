"""The training loop: plain PyTorch, no Ray, the same for every model family. Read it top to bottom.

Each epoch hands the model its phase change (`start_epoch`), then each minibatch to `model.train_step`, which
owns its losses and the order of its steps (the AAE: reconstruction, discriminator, generator, as in
Makhzani et al. 2015, section 2; aae_ray.models.base has the contract). Every logged loss is checked: a NaN
or infinite one raises TrainingDiverged, which a Tune trial reports as a failed trial with its reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from aae_ray.config import AAEConfig
from aae_ray.models import FAMILIES
from aae_ray.models.base import GRAD_CLIP  # noqa: F401  (re-exported)


class TrainingDiverged(RuntimeError):
    """A loss went NaN or infinite; the message says where and what to change."""


@dataclass
class EpochLog:
    epoch: int  # 1-based
    losses: dict[str, float]  # mean of each named loss over the epoch
    seconds: float
    images_per_s: float
    extra: dict[str, float] = field(default_factory=dict)  # filled by callbacks (e.g. val AUROC)


EpochCallback = Callable[[EpochLog, nn.Module], None]


def limit_threads(n: int) -> None:
    """At most n threads for torch and for numpy/SciPy's BLAS and OpenMP pools in this process. Both matter:
    with two one-thread trainings on 2 cores, BLAS left at its default (one thread a core) made the local T2
    fit (256 Ledoit-Wolf covariances) take 95 s instead of 3.3 s, fighting the other process's threads."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)


def resolve_device(cfg: AAEConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no GPU here")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on the CPU: oneDNN's convolutions run faster on it for these small-channel nets (the
    default AAE at 32x32 on 2 cores: training 1.23x, scoring 1.25x, bench/results/speed.md). GPUs keep the
    default layout until it is measured there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`, in that device's memory format (`memory_format`)."""
    return model.to(device).to(memory_format=memory_format(device))


def to_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images (B, C, H, W) on `device`, in the layout `place` gave the model."""
    return x.to(device).contiguous(memory_format=memory_format(device))


def build_model(cfg: AAEConfig) -> nn.Module:
    return FAMILIES[cfg.family](cfg)


def mix_defects(
    n_normal: int, n_defect: int, anomaly_ratio: float | str, rng: np.random.Generator
) -> np.ndarray:
    """Indices into the confirmed defects so that they make up `anomaly_ratio` of the training set ("all":
    each of them once).

    The source research mixes a few defects into training (0.5% was best). With fewer confirmed defects
    than the ratio asks for, they are repeated; with more, a random subset is taken."""
    if anomaly_ratio == "all":
        return np.arange(n_defect, dtype=np.int64)
    if anomaly_ratio == 0 or n_defect == 0:
        return np.empty(0, dtype=np.int64)
    want = max(1, round(anomaly_ratio * n_normal / (1 - anomaly_ratio)))
    return rng.choice(n_defect, size=want, replace=want > n_defect)


def fit_model(
    model: nn.Module,
    x: torch.Tensor,
    defect: torch.Tensor,
    cfg: AAEConfig,
    *,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
) -> list[EpochLog]:
    """Train `model` in place on images x (N, 1, S, S) with defect flags (N,) bool; returns the epoch logs."""
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        limit_threads(cfg.num_threads)
    device = resolve_device(cfg)
    place(model, device)  # before the optimizers: they hold the parameters
    optimizers = model.configure_optimizers()
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochLog] = []
    for epoch in range(1, cfg.epochs + 1):
        model.start_epoch(epoch, x[~defect])
        model.train()
        start, sums, steps = time.perf_counter(), {}, 0
        batches = _batches(len(x), cfg.batch_size, gen)
        for idx in tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress):
            logs = model.train_step(to_batch(x[idx], device), defect[idx].to(device), optimizers)
            _check_finite(logs, epoch, steps, cfg)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        seconds = time.perf_counter() - start
        log = EpochLog(epoch, {k: v / steps for k, v in sums.items()}, seconds, len(x) / seconds)
        history.append(log)
        if on_epoch is not None:
            on_epoch(log, model)
    if model.precise_bn:
        recompute_batchnorm(model, x[~defect], cfg.batch_size)
    model.eval()
    return history


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Replace BatchNorm's running statistics (an average lagging behind the changing weights) by the
    population statistics of the final weights on the training normals ("precise BN", Wu & Johnson 2021).
    With the latent BatchNorm this puts the normals' codes at mean 0 and variance 1 in eval mode, as the
    prior says; without it they were off by a mean norm of 2-6 on Fashion-MNIST."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) < 2:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average over all batches seen
    model.train()
    device = next(model.parameters()).device
    for xb in x.split(batch_size):
        if len(xb) > 1:
            model(to_batch(xb, device))
    for m in norms:
        m.momentum = 0.1


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot train on a single image
        batches.pop()
    return batches


def _check_finite(logs: dict[str, float], epoch: int, step: int, cfg: AAEConfig) -> None:
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    if bad:
        msg = (f"training diverged at epoch {epoch}, step {step}: {bad}; "
               f"try a lower lr (now {cfg.lr}) or lr_adv (now {cfg.lr_adv})")
        raise TrainingDiverged(msg)

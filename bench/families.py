"""The model families on synthetic solder joints (bench/README.md: "Which model when"), and AnoGAN's scoring cost.

Each family: a small model (8 base channels, 32 FC units, a 32-dim latent, batch 64), 30 epochs (Deep SAD:
15 of them pretraining, then sad_lr 1e-3) on the 340 fitting normals of a 400 + 120 joint set, test AUROC on
its 102 test joints (42 defects) for seeds 0, 1, 2: the primary score, Hotelling's T2 of the latent, and the
reconstruction error. The GANs use one discriminator step a batch and 64 discriminator units. Then AnoGAN's
latent search at the default model size, 32x32, batch 64, 2 threads, per image. Run alone: other work skews
the timings.

    python bench/families.py [--cost-only]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from aae_ray.config import AAEConfig
from aae_ray.data.synthetic import make_synthetic_records
from aae_ray.detector import Detector
from aae_ray.models import FAMILIES
from aae_ray.scoring import auroc
from aae_ray.training_loop import build_model

SMALL = {"base_channels": 8, "fc_units": 32, "batch_size": 64, "latent_dim": 32, "epochs": 30, "pretrain_epochs": 15,
         "sad_lr": 1e-3}  # Deep SAD at 1e-3: 6 batches an epoch are too few steps for 1e-4
GAN = {"disc_steps": 1, "disc_units": 64}
REPEATS = 3  # timed batches per step count in anogan_cost; the median is reported


def solder(size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitting normals, the test images and their truth (1 = defect)."""
    records = make_synthetic_records(seed=0, n_normal=400, n_defect=120, size=size)
    X = np.stack([r.pixels for r in records]).astype(np.float32)[:, None] / 255.0
    truth = np.array([r.truth for r in records])
    split = np.array([r.split for r in records])
    return X[(split != "test") & (truth == 0)], X[split == "test"], truth[split == "test"]


def families() -> None:
    torch.set_num_threads(1)
    normals, Xt, yt = solder()
    print("| family | primary score AUROC (seeds 0/1/2) | mean | T² AUROC (mean) | recon. error AUROC (mean) |")
    print("|---|---|---|---|---|")
    for fam in FAMILIES:
        rows = []
        for seed in (0, 1, 2):
            cfg = AAEConfig(family=fam, seed=seed, **SMALL, **(GAN if fam in ("egbad", "anogan") else {}))
            s = Detector(cfg).fit(normals).score(Xt)
            rows.append((auroc(yt, s.score), auroc(yt, s.t2), auroc(yt, s.recon_error)))
        a = np.array(rows)
        print(f"| {fam} | {' / '.join(f'{v:.2f}' for v in a[:, 0])} | {a[:, 0].mean():.2f} | {a[:, 1].mean():.2f} | "
              f"{a[:, 2].mean():.2f} |", flush=True)


def anogan_cost() -> None:
    """Per-image scoring cost of AnoGAN's latent search, beside the AE's one forward pass (the baseline: every
    other family scores in one pass) on the same batch."""
    torch.set_num_threads(2)
    x = torch.rand(64, 1, 32, 32)

    def per_image_ms(fn) -> list[float]:
        fn(x[:2])  # warm-up
        runs = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn(x)
            runs.append((time.perf_counter() - start) / len(x) * 1000)
        return runs

    cases = []
    for name, cfg in (("AE (baseline: one forward pass)", AAEConfig(family="ae")),
                      ("AnoGAN, 50-step latent search", AAEConfig(family="anogan", anogan_steps=50)),
                      ("AnoGAN, 500-step latent search", AAEConfig(family="anogan", anogan_steps=500))):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():  # as Detector scores: AnoGAN's search turns autograd back on inside
            cases.append((name, per_image_ms(model.inference)))
    base = np.median(cases[0][1])
    for name, runs in cases:
        print(f"{name}: {np.median(runs):.2f} ms an image, {np.median(runs) / base:.0f}x the AE (median of {REPEATS} "
              f"batches of {len(x)}: {', '.join(f'{r:.2f}' for r in runs)})", flush=True)

if __name__ == "__main__":
    if "--cost-only" not in sys.argv[1:]:
        families()
    anogan_cost()

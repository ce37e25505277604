"""The model families on a GPU (issue 6: each trains stably at 32/64/128 input), and the AAE's throughput there.

1. Every family x input 32, 64, 128 x seeds 0, 1: fit on CUDA (default model size, 20 epochs) on the 340
   fitting normals of a 400 + 120 synthetic joint set; test AUROC on its 102 test joints (42 defects); every
   score finite; then the saved artifact, loaded on the CPU, scores 32 of them again as the GPU did.
2. With Fashion-MNIST at hand (`--fmnist DIR`): the AAE and the AE of `bench/speed.py`'s shape (class 0's
   6000 training images at 32x32, 3 blocks, 16-dim latent, batch 128) trained and scored on the GPU, and the
   same on this machine's CPU cores as the baseline in the same run; medians of 3 runs.

Needs a CUDA GPU; writes `gpu.json` and `gpu.md` into `--out` after every cell, so a cut-off run keeps what it did.

    python bench/gpu.py [--fmnist /usr/share/datasets/fashion-mnist] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aae_ray import artifacts
from aae_ray.config import AAEConfig
from aae_ray.data.fashion_mnist import load_fashion_mnist
from aae_ray.detector import Detector
from aae_ray.models import FAMILIES
from aae_ray.scoring import auroc

sys.path.insert(0, str(Path(__file__).parent))
from families import solder  # noqa: E402  (bench scripts share helpers, not a package)
from fmnist import COMMIT, machine, resize  # noqa: E402
from speed import MODELS, SHAPE, measure  # noqa: E402

SIZES = (32, 64, 128)
SEEDS = (0, 1)
EPOCHS = 20
CPU_CHECK = 32  # test images the artifact scores again on the CPU
GAN = {"disc_steps": 1}  # one discriminator step a batch, as bench/families.py and bench/fmnist_methods.py


def family_cell(family: str, size: int, seed: int, data: tuple) -> dict:
    normals, Xt, yt = data
    cfg = AAEConfig(family=family, input_size=size, seed=seed, epochs=EPOCHS, device="cuda",
                    **(GAN if family in ("egbad", "anogan") else {}))
    start = time.perf_counter()
    det = Detector(cfg).fit(normals)  # ends in fit_statistics, which copies results back: the GPU is done
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    s = det.score(Xt)
    score_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:  # 32 images: AnoGAN's search at 128 is slow on a CPU
        artifacts.save(det, Path(tmp) / "model", {})
        on_cpu = artifacts.load(Path(tmp) / "model").score(Xt[:CPU_CHECK])
    finite = all(np.isfinite(a).all() for a in (s.score, s.t2, s.recon_error))
    losses = [v for e in det.history_ for v in e.losses.values()]
    return {"family": family, "size": size, "seed": seed, "fit_s": fit_s, "score_images_per_s": len(Xt) / score_s,
            "auroc": auroc(yt, s.score), "auroc_t2": auroc(yt, s.t2), "finite": bool(finite),
            "losses_finite": bool(np.isfinite(losses).all()),
            # AnoGAN's latent search is an optimisation: the CPU's arithmetic order can move its end point
            "cpu_gpu_max_rel_diff": float(np.max(np.abs(on_cpu.score - s.score[:CPU_CHECK])
                                                 / (np.abs(s.score[:CPU_CHECK]) + 1e-6)))}


def throughput(device: str, X: np.ndarray, Xt: np.ndarray) -> dict:
    """bench/speed.py's measurement on this device, threads left at torch's default (all cores)."""
    out = {}
    for name, family in MODELS:
        out[name] = measure(AAEConfig(family=family, **SHAPE, epochs=2, device=device), X, Xt, repeats=3)
        print(device, name, {k: round(v) for k, v in out[name].items() if not k.endswith("runs")}, flush=True)
    return out


def per_seed(rows: list[dict], key: str) -> str:
    return " / ".join(format(r[key], ".2f") for r in rows)


def markdown(doc: dict) -> str:
    lines = ["# The model families on a GPU", "", f"Machine: {doc['machine']}. Produced by `python bench/gpu.py` "
             f"at {doc['commit']}.", "",
             f"Each family at input 32, 64 and 128, seeds {', '.join(map(str, SEEDS))}: default model size, "
             f"{EPOCHS} epochs on CUDA (GANs: one discriminator step a batch) on 340 synthetic normal joints; test "
             "AUROC of the primary score on 102 test joints (42 defects). 'CPU = GPU' is the largest relative "
             f"difference between the GPU's scores of the first {CPU_CHECK} test images and those of the saved "
             "artifact loaded on the CPU. This checks that every family trains and scores on CUDA at every input "
             "size; a short run on synthetic data, it ranks nothing (bench/families.md and bench/fmnist_methods.md "
             "compare the families).", "",
             "| family | input | AUROC (per seed) | T² AUROC | all finite | CPU = GPU (max rel. diff) | fit s | "
             "scoring images/s |", "|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        for size in SIZES:
            rows = [r for r in doc["cells"] if r["family"] == fam and r["size"] == size]
            if not rows:
                continue
            lines.append(
                f"| {fam} | {size} | {per_seed(rows, 'auroc')} | {per_seed(rows, 'auroc_t2')} | "
                f"{'yes' if all(r['finite'] and r['losses_finite'] for r in rows) else 'NO'} | "
                f"{max(r['cpu_gpu_max_rel_diff'] for r in rows):.1e} | "
                f"{np.median([r['fit_s'] for r in rows]):.1f} | "
                f"{np.median([r['score_images_per_s'] for r in rows]):.0f} |")
    if doc.get("throughput"):
        lines += ["", "## Throughput, GPU against this machine's CPU cores (the baseline, same run)", "",
                  "`bench/speed.py`'s shape: Fashion-MNIST class 0 (6000 images) at 32x32, 3 blocks, 16-dim latent, "
                  "batch 128, training timed on the last of 2 epochs, scoring the 10000 test images; medians of 3 "
                  "runs.", "", "| model | device | training images/s | scoring images/s |", "|---|---|---|---|"]
        for device, res in doc["throughput"].items():
            for name, r in res.items():
                lines.append(f"| {name} | {device} | {r['train_images_per_s']:.0f} | {r['score_images_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmnist", type=Path, default=None, help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU; torch sees none here")
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": machine(), "commit": COMMIT or "an unnamed commit", "epochs": EPOCHS, "cells": [],
                 "throughput": {}}

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "gpu.md").write_text(markdown(doc))

    for size in SIZES:
        data = solder(size)
        for fam in FAMILIES:
            for seed in SEEDS:
                cell = family_cell(fam, size, seed, data)
                doc["cells"].append(cell)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in cell.items()}, flush=True)
                save()
    if args.fmnist is not None:
        xtr, ytr, xte, _ = load_fashion_mnist(args.fmnist)
        X, Xt = resize(xtr[ytr == 0], 32), resize(xte, 32)
        for device in ("cuda", "cpu"):
            doc["throughput"][device] = throughput(device, X, Xt)
            save()


if __name__ == "__main__":
    main()

"""Training and scoring throughput of the default detector (issue 14 targets: >= 1,000 images/s training and
>= 3,000 images/s scoring at 32x32 on this machine's 2 cores).

Baselines in the same run: the same AAE without its spatial latent (global T2 only), the plain AE of the same
shape (the cost of the adversarial steps), and the default in torch's plain memory layout (what channels-last,
aae_ray.training_loop.memory_format, buys on the CPU). Each number is the median of `--repeats` runs, the rows
interleaved so that a slow spell of the machine falls on all of them; training is timed on the last epoch of each
run (the first pays for allocator warm-up). Run alone: other work on the 2 cores skews the numbers.

    python bench/speed.py [--repeats 3] [--epochs 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import machine, resize32  # noqa: E402  (bench scripts share helpers, not a package)

import aae_ray.training_loop  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402

CHANNELS_LAST = aae_ray.training_loop.memory_format
PLAIN = lambda device: torch.contiguous_format  # noqa: E731
# (row name, config fields over the default, memory layout)
ROWS = (
    ("AAE default (global + local T2)", {}, CHANNELS_LAST),
    ("AAE global T2 only (local_depth 0)", {"local_depth": 0}, CHANNELS_LAST),
    ("AE, same shape (baseline)", {"family": "ae"}, CHANNELS_LAST),
    ("AAE default, plain memory layout (baseline)", {}, PLAIN),
)


def measure_once(cfg: AAEConfig, layout, X: np.ndarray, Xt: np.ndarray) -> tuple[float, float]:
    aae_ray.training_loop.memory_format = layout
    try:
        det = Detector(cfg).fit(X)
        t0 = time.perf_counter()
        det.score(Xt, maps=False)
        return det.history_[-1].images_per_s, len(Xt) / (time.perf_counter() - t0)
    finally:
        aae_ray.training_loop.memory_format = CHANNELS_LAST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    xtr, ytr, xte, _ = load_fashion_mnist()
    X, Xt = resize32(xtr[ytr == 0]), resize32(xte)
    runs: dict[str, dict[str, list[float]]] = {name: {"train": [], "score": []} for name, _, _ in ROWS}
    for r in range(args.repeats):
        for name, fields, layout in ROWS:
            cfg = AAEConfig(epochs=args.epochs, num_threads=2, seed=r, **fields)
            train, score = measure_once(cfg, layout, X, Xt)
            runs[name]["train"].append(train)
            runs[name]["score"].append(score)
            print(f"run {r + 1}/{args.repeats}  {name}: training {train:,.0f} img/s, scoring {score:,.0f} img/s",
                  flush=True)
    results = {name: {"train_images_per_s": float(np.median(v["train"])),
                      "score_images_per_s": float(np.median(v["score"])),
                      "train_runs": v["train"], "score_runs": v["score"]} for name, v in runs.items()}
    default, plain = results[ROWS[0][0]], results[ROWS[3][0]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"machine": machine(), "commit": commit, "config": AAEConfig().model_dump(), "epochs": args.epochs,
           "n_train": len(X), "n_score": len(Xt), "repeats": args.repeats, "results": results,
           "channels_last_speedup": {"train": default["train_images_per_s"] / plain["train_images_per_s"],
                                     "score": default["score_images_per_s"] / plain["score_images_per_s"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    cfg = AAEConfig()
    lines = ["# Throughput", "",
             f"Machine: {doc['machine']}. Commit: {commit}. {len(X)} Fashion-MNIST images (class 0) at 32x32, the "
             f"default config ({cfg.conv_blocks} conv blocks, {cfg.latent_dim}-dim latent, local_dim {cfg.local_dim}, "
             f"batch {cfg.batch_size}); scoring {len(Xt)} test images (numbers, no maps). Median of {args.repeats} "
             "interleaved runs. Produced by `make bench-speed`.", "",
             "| model | training images/s | scoring images/s |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_images_per_s']:,.0f} | {r['score_images_per_s']:,.0f} |")
    sp = doc["channels_last_speedup"]
    lines += ["", f"Channels-last over the plain layout (the default): training {sp['train']:.2f}x, scoring "
              f"{sp['score']:.2f}x. Targets (issue 14): >= 1,000 images/s training, >= 3,000 images/s scoring, "
              "for the default."]
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Training and scoring throughput (issue 2 targets: >= 1,000 images/s training and >= 3,000 images/s
scoring for a 32x32, 3-block, 16-dim-latent AAE on this machine).

Baseline in the same run: the plain AE of the same shape (the cost of the adversarial steps shows as the
ratio). Each number is the median of `--repeats` runs; training is timed on the last epoch of each run
(the first pays for allocator warm-up). Run alone: other work on the machine's 2 cores skews the numbers.

    python bench/speed.py [--repeats 3] [--epochs 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import machine, resize32  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402

SHAPE = {"input_size": 32, "conv_blocks": 3, "latent_dim": 16}  # the benchmark model
MODELS = (("AAE", "aae"), ("AE (baseline)", "ae"))


def measure(cfg: AAEConfig, X: np.ndarray, Xt: np.ndarray, repeats: int) -> dict:
    train, score = [], []
    for r in range(repeats):
        det = Detector(cfg.model_copy(update={"seed": r})).fit(X)
        train.append(det.history_[-1].images_per_s)
        t0 = time.perf_counter()
        det.score(Xt)
        score.append(len(Xt) / (time.perf_counter() - t0))
    return {"train_images_per_s": float(np.median(train)), "score_images_per_s": float(np.median(score)),
            "train_runs": train, "score_runs": score}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    xtr, ytr, xte, _ = load_fashion_mnist()
    X, Xt = resize32(xtr[ytr == 0]), resize32(xte)
    shape = {**SHAPE, "epochs": args.epochs, "num_threads": 2}
    results = {}
    for name, family in MODELS:
        results[name] = measure(AAEConfig(family=family, **shape), X, Xt, args.repeats)
        print(name, {k: round(v) for k, v in results[name].items() if not k.endswith("runs")}, flush=True)
    aae, ae = results["AAE"], results["AE (baseline)"]
    doc = {"machine": machine(), "config": shape, "batch_size": AAEConfig().batch_size, "n_train": len(X),
           "n_score": len(Xt), "repeats": args.repeats, "results": results,
           "ratio_train_aae_over_ae": aae["train_images_per_s"] / ae["train_images_per_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Throughput", "", f"Machine: {doc['machine']}. {len(X)} Fashion-MNIST images (class 0) at 32x32, "
             f"3 conv blocks, 16-dim latent, batch {doc['batch_size']}; scoring {len(Xt)} test images. "
             f"Median of {args.repeats} runs. Produced by `python bench/speed.py`.", "",
             "| model | training images/s | scoring images/s |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_images_per_s']:.0f} | {r['score_images_per_s']:.0f} |")
    lines += ["", f"AAE/AE training throughput ratio: {doc['ratio_train_aae_over_ae']:.2f}. "
              "Targets: >= 1,000 images/s training, >= 3,000 images/s scoring (AAE)."]
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

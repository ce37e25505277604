"""Pool scoring throughput (issue 4): Ray Data actors vs one process, same model, same pool, same run.

The pool: all 70,000 Fashion-MNIST images (train + test) as unlabeled images, scored at 32x32 by a small AAE
(trained for one epoch: the weights do not change the cost). Each engine scores the whole pool `--repeats`
times, alternating; images/s is the median. `aae-ray score` picks Ray Data above 2 GiB of decoded pool.
The result is merged into bench/results/active_learning.json as `scoring_images_per_s`.

    python bench/pool_scoring.py [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine, resize32  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import artifacts  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from aae_ray.data.images import ImageRecord, stable_id  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402
from aae_ray.pool_scoring import score_pool  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import ray
    import torch

    torch.set_num_threads(2)
    xtr, ytr, xte, yte = load_fashion_mnist()
    pixels = np.concatenate([xtr, xte])
    records = [ImageRecord(stable_id("bench-pool", str(i)), p, f"fashion-mnist:{i}", "pool", None)
               for i, p in enumerate(pixels)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ws, _ = Workspace.import_records(Path(tmp) / "ws", records, {"source": "fashion-mnist", "bench": "pool"}, [])
        print(f"imported {len(records)} images in {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = AAEConfig(input_size=32, conv_blocks=3, latent_dim=16, epochs=1, num_threads=2)
        det = Detector(cfg).fit(resize32(xtr[ytr == 0][:2000]))
        artifacts.save(det, ws.model_dir(0), {"round": 0, "val_auroc": None, "test_auroc": None, "trial": None,
                                              "data_fingerprint": "bench"})
        ws.promote(0, "bench")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs: dict[str, list[float]] = {"local": [], "ray": []}
        for r in range(args.repeats):
            for engine in ("local", "ray"):
                t0 = time.perf_counter()
                _, table = score_pool(ws, engine=engine)
                runs[engine].append(len(table) / (time.perf_counter() - t0))
                print(f"  run {r + 1} {engine}: {runs[engine][-1]:,.0f} images/s", flush=True)
    result = {"pool": len(records), "input_size": 32, "repeats": args.repeats, "commit": COMMIT,
              "machine": machine(), "one_process": float(np.median(runs["local"])),
              "ray_data": float(np.median(runs["ray"])), "runs": runs,
              "note": "whole `score_pool` call: decode + score + queue order + write; Ray Data with 2 actors"}
    path = args.out / "active_learning.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["scoring_images_per_s"] = result
    path.write_text(json.dumps(doc, indent=2) + "\n")
    md = args.out / "active_learning.md"
    section = (f"\n## Pool scoring throughput (`python bench/pool_scoring.py`, code {COMMIT})\n\n"
               f"{len(records):,} images at 32x32, the whole `score_pool` call, median of {args.repeats}: "
               f"one process **{result['one_process']:,.0f}** images/s, Ray Data (2 actors) "
               f"**{result['ray_data']:,.0f}** images/s.\n")
    text = md.read_text() if md.exists() else ""
    md.write_text(text.split("\n## Pool scoring throughput")[0].rstrip("\n") + "\n" + section)
    print(json.dumps({k: result[k] for k in ("one_process", "ray_data")}))


if __name__ == "__main__":
    main()

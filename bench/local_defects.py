"""Local defects: image AUROC, pixel AUROC and AUPRO of every family, the AAE's global / local / combined T2
and the patch baseline (issue 14).

Datasets (the defects are synthetic everywhere; say so wherever these numbers go):
  joints32, joints64  the synthetic solder joints of `aae-ray demo` (800 normals, 80 defects drawn at 128 px,
                      the generator's masks), resized to the model's input; train on the normals outside the
                      test split, test on the test split (120 normals, 28 defects);
  brick, grass, gravel  real photographs shipped inside scikit-image, cut into 32 px crops (600 train, 100 test
                      normals), with synthetic scratches, spots, cracks and smudges drawn on 100 test crops
                      (aae_ray.data.surfaces);
  fmnist0 .. fmnist9  Fashion-MNIST clean one-class (all 6,000 train images of the class; the official test
                      set, the other classes anomalous): image AUROC only, the new default against the global
                      AAE, one seed, so nothing global is lost.
Every trained family gets the same epoch budget (--epochs). Each finished cell (dataset, method, seed) is
saved at once in OUT/NAME.json (atomically, under a lock), so a stopped run continues where it stopped.

    python bench/local_defects.py [--epochs 20] [--seeds 0 1 2] [--datasets ...] [--methods ...]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine, resize  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import scoring  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.images import encode_png, mask_arrays, to_model_input  # noqa: E402
from aae_ray.data.surfaces import SURFACES, surface_arrays  # noqa: E402
from aae_ray.data.synthetic import make_synthetic_records  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402
from aae_ray.localization import aupro, pixel_auroc  # noqa: E402

JOINTS = {"joints32": 32, "joints64": 64}
FMNIST = [f"fmnist{k}" for k in range(10)]
DATASETS = ["joints32", *SURFACES, *FMNIST, "joints64"]  # the run's order: joints64 costs 4x, it goes last
# method -> the AAEConfig fields that make it (on top of AAEConfig's defaults: the default config is "aae")
METHODS = {"aae": {}, "aae_global": {"local_depth": 0}, "patch": {"family": "patch"}, "ae": {"family": "ae"},
           "vae": {"family": "vae"}, "deepsad": {"family": "deepsad"}, "egbad": {"family": "egbad"},
           "anogan": {"family": "anogan"},
           # textures look alike everywhere: one Gaussian shared by every position (surfaces only)
           "aae_shared": {"local_stats": "shared"}, "patch_shared": {"family": "patch", "local_stats": "shared"},
           # parts that move a little: the distance to the nearest normal code within a cell (scoring.LocalNearest)
           "aae_nearest": {"local_stats": "nearest"}, "aae_nearest_local": {"local_stats": "nearest", "score": "local"},
           "patch_nearest": {"family": "patch", "local_stats": "nearest"}}
SURFACE_ONLY = {"aae_shared", "patch_shared"}
FMNIST_METHODS = ["aae", "aae_global"]  # the new default against today's global T2 AAE
COSTLY = {"egbad", "anogan"}  # one seed: AnoGAN's latent search costs ~20 ms an image


# --- data -------------------------------------------------------------------------------------------------------

def dataset(name: str, seed: int) -> dict:
    """{X_train, X_test, y_test, mask_test (None for Fashion-MNIST)} as float32 model input."""
    if name in JOINTS:
        size = JOINTS[name]
        recs = make_synthetic_records(seed=0, n_normal=800, n_defect=80, size=128)  # the demo's joints
        X = to_model_input([encode_png(r.pixels) for r in recs], size)
        masks = mask_arrays([None if r.mask is None else encode_png(r.mask) for r in recs], size)
        y = np.array([r.truth for r in recs], dtype=np.int8)
        test = np.array([r.split == "test" for r in recs])
        return {"X_train": X[~test & (y == 0)], "X_test": X[test], "y_test": y[test], "mask_test": masks[test]}
    if name in SURFACES:
        s = surface_arrays(name, size=32, seed=0)  # one data set; the seeds vary the models
        return {"X_train": s.X_train, "X_test": s.X_test, "y_test": s.y_test, "mask_test": s.mask_test}
    from aae_ray.data.fashion_mnist import load_fashion_mnist

    k = int(name.removeprefix("fmnist"))
    x, y, xt, yt = load_fashion_mnist()
    return {"X_train": resize(x[y == k], 32), "X_test": resize(xt, 32), "y_test": (yt != k).astype(np.int8),
            "mask_test": None}


# --- one cell ---------------------------------------------------------------------------------------------------

def run_cell(name: str, method: str, seed: int, data: dict, epochs: int, threads: int) -> list[dict]:
    """Fit `method` once; one row per score it gives (the AAE: global, local and combined)."""
    size = data["X_train"].shape[-1]
    fields = {"epochs": epochs, "seed": seed, "num_threads": threads, "input_size": size, **METHODS[method]}
    start = time.perf_counter()
    det = Detector(AAEConfig(**fields)).fit(data["X_train"])
    fit_s = time.perf_counter() - start
    variants = {det.primary_: det}
    if det.primary_ == "combined":  # the same network, its statistics refitted for each single score
        for score in ("global", "local"):
            variants[score] = det.rescored(data["X_train"], score=score)
    rows = []
    for score, d in variants.items():
        s = d.score(data["X_test"], maps=data["mask_test"] is not None)
        y = data["y_test"]
        tpr, fpr = scoring.rates_at(y, s.score, d.threshold_)
        row = {"dataset": name, "method": method, "family": det.config.family, "score": score, "seed": seed,
               "image_auroc": scoring.auroc(y, s.score), "tpr_at_threshold": tpr, "fpr_at_threshold": fpr,
               "threshold_basis": d.limit_.method, "seconds": round(fit_s + time.perf_counter() - start, 1),
               "epochs": epochs if det.model_.trainable else 0}
        if data["mask_test"] is not None:
            row["pixel_auroc"] = pixel_auroc(data["mask_test"], s.maps)
            defect = y == 1
            row["aupro"] = aupro(data["mask_test"][defect], s.maps[defect]) if defect.any() else float("nan")
            row["map"] = d.map_label
        rows.append(row)
    return rows


# --- the table --------------------------------------------------------------------------------------------------

def cell_key(r: dict) -> tuple:
    return r["dataset"], r["method"], r["seed"], r["epochs"]


def record(path: Path, rows: list[dict], meta: dict) -> list[dict]:
    """Add finished rows to PATH (under a lock, from what is on disk) and rewrite PATH and its .md."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()).get("cells", []) if path.exists() else []
        # A cell run twice (two runs at once) counts once: the later result replaces the earlier.
        cells = list({(*cell_key(c), c["score"]): c for c in old + rows}.values())
        doc = {**meta, "cells": cells, "rows": aggregate(cells)}
        for suffix, text in ((".json", json.dumps(doc, indent=2, allow_nan=True) + "\n"), (".md", markdown(doc))):
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path.with_suffix(suffix))
    return cells


METRICS = ("image_auroc", "pixel_auroc", "aupro", "tpr_at_threshold", "fpr_at_threshold")


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (dataset, method, score): the mean over seeds of each metric, its seeds and std."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["method"], c["score"]), []).append(c)
    rows = []
    for (name, method, score), cs in groups.items():
        row = {"dataset": name, "method": method, "score": score, "seeds": sorted(c["seed"] for c in cs),
               "cpu": ", ".join(sorted({_cpu(c["machine"]) for c in cs})),
               "seconds": float(np.median([c["seconds"] for c in cs]))}
        for m in METRICS:
            vals = [c[m] for c in cs if m in c and c[m] is not None and np.isfinite(c[m])]
            row[m] = float(np.mean(vals)) if vals else None
            if m == "image_auroc" and len(vals) > 1:
                row["image_auroc_std"] = float(np.std(vals))
        rows.append(row)
    return rows


def _cpu(machine: str) -> str:
    return machine.removeprefix("vm: ").split(" Processor")[0].split(",")[0].replace("(R)", "")


def _f(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def markdown(doc: dict) -> str:
    lines = ["# Local defects: image AUROC, pixel AUROC, AUPRO (issue 14)", "",
             "Machines: " + "; ".join(sorted({c["machine"] for c in doc["cells"]})) + " (each row names its CPU). "
             "Commits: " + ", ".join(sorted({c["commit"] for c in doc["cells"]})) + ". "
             f"Epochs per trained family: {doc['epochs']} "
             f"(Fashion-MNIST: {doc.get('fmnist_epochs')}). Produced by `make bench-local`.",
             "Defects are synthetic on every data set: on the synthetic joints, and drawn by aae_ray.data.surfaces "
             "on crops of real photographs (scikit-image's brick, grass, gravel). TPR/FPR at the calibrated "
             "threshold (alpha 0.01). Mean ± std over the seeds listed.", "",
             "| dataset | method | score | image AUROC | pixel AUROC | AUPRO | TPR | FPR | seeds | s | cpu |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(doc["rows"], key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else 99,
                                                 list(METHODS).index(r["method"]), r["score"])):
        image = _f(r["image_auroc"], r.get("image_auroc_std"))
        cols = [r["dataset"], r["method"], r["score"], image, _f(r["pixel_auroc"]), _f(r["aupro"]),
                _f(r["tpr_at_threshold"]), _f(r["fpr_at_threshold"]), ",".join(map(str, r["seeds"])),
                f"{r['seconds']:.0f}", r["cpu"]]
        lines.append("| " + " | ".join(cols) + " |")
    fm = [r for r in doc["rows"] if r["dataset"].startswith("fmnist") and r["score"] in ("combined", "global")]
    for method in FMNIST_METHODS:
        vals = [r["image_auroc"] for r in fm if r["method"] == method and r["score"] != "local"
                and (method != "aae" or r["score"] == "combined")]
        if vals:
            lines.append(f"\nFashion-MNIST clean one-class, {method}: mean image AUROC {np.mean(vals):.3f} over "
                         f"{len(vals)} classes.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--fmnist-epochs", type=int, default=10, help="6,000 images a class: 10 epochs, as fmnist_methods")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="local_defects")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    done = {cell_key(c) for c in json.loads(path.read_text()).get("cells", [])} if path.exists() else set()
    meta = {"machine": machine(), "commit": COMMIT, "epochs": args.epochs, "fmnist_epochs": args.fmnist_epochs}
    epochs_of = {name: args.fmnist_epochs if name in FMNIST else args.epochs for name in DATASETS}
    todo = []
    for name in args.datasets:
        methods = FMNIST_METHODS if name in FMNIST else [m for m in args.methods
                                                         if m not in SURFACE_ONLY or name in SURFACES]
        for method in (m for m in args.methods if m in methods):
            one = name in FMNIST or method in COSTLY or METHODS[method].get("family") == "patch"  # patch: no seed
            seeds = args.seeds[:1] if one else args.seeds
            for seed in seeds:
                key = (name, method, seed, 0 if METHODS[method].get("family") == "patch" else epochs_of[name])
                if key not in done:
                    todo.append(key)
    print(f"{len(done)} cells done in {path}, {len(todo)} to run, {args.epochs} epochs each", flush=True)
    cache: dict[str, dict] = {}
    for i, (name, method, seed, _) in enumerate(todo, 1):
        if name not in cache:
            cache.clear()
            cache[name] = dataset(name, seed)
        rows = run_cell(name, method, seed, cache[name], epochs_of[name], args.threads)
        record(path, [{**r, "machine": meta["machine"], "commit": COMMIT} for r in rows], meta)
        print(f"[{i}/{len(todo)}] " + "  ".join(
            f"{r['dataset']} {r['method']}/{r['score']} seed {r['seed']}: image {r['image_auroc']:.3f}"
            + (f" pixel {r['pixel_auroc']:.3f} aupro {r['aupro']:.3f}" if "pixel_auroc" in r else "")
            for r in rows) + f"  ({rows[0]['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

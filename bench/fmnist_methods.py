"""Every model family on Fashion-MNIST by the Deep SAD protocol, beside the Deep SAD paper's numbers (issue 6).

One-vs-rest: each class in turn is normal. Training set (Ruff et al. 2020): the normal class's train images,
polluted with unlabeled anomalies from the other classes (pollution 0.1), plus labeled anomalies from one
other class at ratio 0, 0.01 or 0.05 (aae_ray.data.fashion_mnist.deepsad_split). Test: the official 10,000
images. Every method gets the same epoch budget; the other settings are AAEConfig's defaults (32x32, 32-dim
latent; Deep SAD pretrains for `pretrain_epochs` of them, AnoGAN scores with a 50-step latent search).

Methods: aae_mixing (labeled anomalies mixed into training as anomaly_ratio, defect_loss "none"), aae_push
(the same, plus Deep SAD's inverse-distance push on them), ae, vae, deepsad, egbad, anogan. Each gets the
labeled anomalies at the same ratio (what it does with them: see its module in aae_ray/models). At ratio 0
there are no labeled anomalies, so aae_mixing and aae_push are the same model: only aae_mixing runs there.
Reported: test AUROC of the family's primary score (T2 for the AAE), and of Hotelling's T2 of its latent
(every family has one), mean +- std over the normal classes (per class: the mean over seeds).

--findings also checks the source research's qualitative findings, on clean one-class training (all 6,000
train images of the class, no pollution) for --findings-classes: AAE vs AE, a 5-dim vs a 16-dim latent,
32x32 vs 64x64 input.

    python bench/fmnist_methods.py [--epochs 10] [--classes 0 1 ...] [--ratios 0 0.01 0.05] [--findings]
Each finished cell (method, ratio, class, seed) is saved at once (atomically, under a lock) in OUT/NAME.json; a
rerun with the same epochs skips the cells already there, so a stopped run continues where it stopped, and
several processes with different --classes can fill one table.
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
from fmnist import COMMIT, POLLUTION, machine, resize  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import scoring  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import CLASSES, deepsad_split, load_fashion_mnist  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402

CLASSES_ALL, RATIOS, FINDINGS_CLASSES = list(range(10)), [0.0, 0.01, 0.05], [0, 2, 4, 6]  # the default grid
# method -> the AAEConfig fields that make it
METHODS = {
    "aae_mixing": {"family": "aae", "defect_loss": "none"},
    "aae_push": {"family": "aae", "defect_loss": "push"},
    "ae": {"family": "ae"},
    "vae": {"family": "vae"},
    "deepsad": {"family": "deepsad"},
    "egbad": {"family": "egbad"},
    "anogan": {"family": "anogan"},
}
PRIMARY = {"aae": "T2", "ae": "recon", "vae": "ELBO", "deepsad": "distance", "egbad": "residual+feature",
           "anogan": "residual+feature"}
# Ruff et al. 2020 (Deep SAD), Fashion-MNIST, pollution 0.1, labeled-anomaly ratio 0 / 0.01 / 0.05: mean AUROC
PAPER = {"Deep SAD (paper)": {0.0: 0.892, 0.01: 0.900, 0.05: 0.905},
         "SSAD hybrid (paper)": {0.0: 0.912, 0.01: 0.894, 0.05: 0.905}}
# the qualitative checks: variant -> the AAEConfig fields that differ from the default AAE
FINDINGS = {
    "aae": {},
    "ae": {"family": "ae"},
    "aae_latent5": {"latent_dim": 5},
    "aae_latent16": {"latent_dim": 16},
    "aae_input64": {"input_size": 64},
}


# --- one cell -------------------------------------------------------------------------------------------------

def config(fields: dict, epochs: int, seed: int, threads: int, ratio: float = 0.0) -> AAEConfig:
    family = fields.get("family", "aae")
    return AAEConfig(**{"epochs": epochs, "seed": seed, "num_threads": threads, "anomaly_ratio": ratio,
                        "latent_norm": family == "aae", **fields})  # as bench/fmnist.py: no latent BN for the AE


def evaluate(det: Detector, Xt: np.ndarray, test_y: np.ndarray) -> dict:
    s = det.score(Xt)
    return {"auroc": scoring.auroc(test_y, s.score), "t2_auroc": scoring.auroc(test_y, s.t2),
            "recon_auroc": scoring.auroc(test_y, s.recon_error), "n_train": det.n_train_ + det.n_defects_mixed_,
            "train_images_per_s": float(np.median([h.images_per_s for h in det.history_]))}


def protocol_cell(method: str, ratio: float, k: int, seed: int, data: Data, epochs: int, threads: int) -> dict:
    """Train `method` on class k's Deep SAD training set at this labeled ratio; test AUROCs."""
    sp = deepsad_split(data.y, data.yt, normal_class=k, pollution=POLLUTION, labeled_ratio=ratio,
                       val_fraction=0.0, seed=seed)
    idx = np.concatenate([sp.pool_normal, sp.pool_anomaly, sp.labeled_anomaly])
    labels = np.r_[np.zeros(len(sp.pool_normal) + len(sp.pool_anomaly)), np.ones(len(sp.labeled_anomaly))]
    det = Detector(config(METHODS[method], epochs, seed, threads, ratio)).fit(data.X(32)[idx], labels.astype(np.int8))
    return evaluate(det, data.Xt(32), (data.yt != k).astype(np.int8))


def findings_cell(variant: str, k: int, seed: int, data: Data, epochs: int, threads: int) -> dict:
    """Train the variant on all of class k's train images (clean); test AUROCs."""
    cfg = config(FINDINGS[variant], epochs, seed, threads)
    det = Detector(cfg).fit(data.X(cfg.input_size)[data.y == k])
    return evaluate(det, data.Xt(cfg.input_size), (data.yt != k).astype(np.int8))


class Data:
    """Fashion-MNIST, resized on first use to each input size asked for."""

    def __init__(self) -> None:
        self.x, self.y, self.xt, self.yt = load_fashion_mnist()
        self._sized: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _size(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._sized:
            self._sized[size] = resize(self.x, size), resize(self.xt, size)
        return self._sized[size]

    def X(self, size: int) -> np.ndarray:
        return self._size(size)[0]

    def Xt(self, size: int) -> np.ndarray:
        return self._size(size)[1]


# --- aggregation and writing ----------------------------------------------------------------------------------

def per_class(rows: list[dict], key: str) -> dict[int, float]:
    """Class -> the mean over seeds of `key`."""
    classes = sorted({r["normal_class"] for r in rows})
    return {c: float(np.mean([r[key] for r in rows if r["normal_class"] == c])) for c in classes}


def summary(rows: list[dict], key: str) -> tuple[float, float, dict[int, float]]:
    pc = per_class(rows, key)
    return float(np.mean(list(pc.values()))), float(np.std(list(pc.values()))), pc


def settings(rows: list[dict]) -> list[dict]:
    """The core benchmark's `settings` form: one entry per method x labeled ratio x score."""
    out = []
    for method in METHODS:
        family = METHODS[method]["family"]
        for ratio in sorted({r["labeled_ratio"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if r["method"] == method and r["labeled_ratio"] == ratio]
            scores = [("auroc", PRIMARY[family])] + ([("t2_auroc", "T2")] if family != "aae" else [])
            for key, name in scores:
                mean, std, pc = summary(sel, key)
                out.append({"method": f"{family.upper()}-{name}", "protocol": "deepsad", "pollution": POLLUTION,
                            "labeled_ratio": ratio, "defect_loss": METHODS[method].get("defect_loss", "none"),
                            "t2_trim": 0.0, "mean_auroc": mean, "std_auroc": std,
                            "per_class": {str(c): round(v, 4) for c, v in pc.items()},
                            "bench_method": method, "seeds": sorted({r["seed"] for r in sel})})
    return out


def pm(rows: list[dict], key: str) -> str:
    if not rows:
        return "–"
    mean, std, _ = summary(rows, key)
    return f"{mean:.3f} ± {std:.3f}"


def markdown(doc: dict) -> str:
    rows = [r for r in doc["runs"] if r["part"] == "protocol"]
    ratios = sorted({r["labeled_ratio"] for r in rows})
    head = " | ".join(f"ratio {g}" for g in ratios)
    lines = [f"# Fashion-MNIST: every family by the Deep SAD protocol ({'complete' if doc['complete'] else 'PARTIAL'})",
             "", f"Machine: {doc['machine']}. Commit {doc['commit']}. {doc['epochs']} epochs for every method, "
             f"otherwise AAEConfig's defaults (32x32 input, 32-dim latent). Pollution {POLLUTION}; labeled anomalies "
             f"from one other class. Seeds {doc['seeds']} (config and split seed = 10 x seed + class). Time in the "
             f"{doc['cells']} cells, summed (processes may overlap): {doc['wall_s'] / 60:.1f} min. Produced by "
             + "; ".join(f"`python bench/fmnist_methods.py {a}`".replace(" `", "`") for a in doc["invocations"])
             + "."]
    findings = findings_markdown([r for r in doc["runs"] if r["part"] == "findings"])
    if not rows:  # a --findings run alone
        return "\n".join(lines + findings) + "\n"
    lines += ["", "Test AUROC, mean ± std over the normal classes, of each family's primary score and of Hotelling's "
              "T² of its latent. At ratio 0 there are no labeled anomalies, so AAE mixing and AAE push are the same "
              "model (run once, as mixing).", "",
              f"| method | primary score | {head} | T² {' | T² '.join(f'ratio {g}' for g in ratios)} |",
              "|---|---|" + "---|" * (2 * len(ratios))]
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        family = METHODS[method]["family"]
        prim = [pm([r for r in sel if r["labeled_ratio"] == g], "auroc") for g in ratios]
        t2 = [pm([r for r in sel if r["labeled_ratio"] == g], "t2_auroc") for g in ratios]
        if method == "aae_push" and 0.0 in ratios:
            prim[ratios.index(0.0)] = t2[ratios.index(0.0)] = "= aae_mixing"
        classes = sorted({r["normal_class"] for r in sel})
        # a method not yet run on every class is not comparable with the others' means: say over which classes
        name = method if len(classes) == len({r["normal_class"] for r in rows}) else \
            f"{method} (classes {', '.join(map(str, classes))} only)"
        lines.append(f"| {name} | {PRIMARY[family]} | {' | '.join(prim)} | {' | '.join(t2)} |")
    for name, ref in PAPER.items():
        lines.append(f"| {name} | – | {' | '.join(f'{ref[g]:.3f}' if g in ref else '–' for g in ratios)} |"
                     + " |" * len(ratios))
    took = {m: [r["seconds"] for r in rows if r["method"] == m] for m in METHODS}
    # the median: a cell that shared the cores with other work (tests, a second bench) must not move the typical
    lines += ["", "Seconds a cell (training, then scoring the fitting normals and the 10,000 test images), median "
              "(slowest): " + ", ".join(f"{m} {np.median(t):.0f} ({max(t):.0f})" for m, t in took.items() if t) + "."]
    for g in ratios:
        sel = [r for r in rows if r["labeled_ratio"] == g]
        classes = sorted({r["normal_class"] for r in sel})
        lines += ["", f"Per class, labeled ratio {g} (primary score AUROC, mean over seeds):", "",
                  "| method | " + " | ".join(f"{c} {CLASSES[c]}" for c in classes) + " |",
                  "|---|" + "---|" * len(classes)]
        for method in METHODS:
            pc = per_class([r for r in sel if r["method"] == method], "auroc")
            if pc:
                lines.append(f"| {method} | " + " | ".join(f"{pc[c]:.3f}" if c in pc else "–" for c in classes)
                             + " |")
    return "\n".join(lines + findings) + "\n"


def findings_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    classes = sorted({r["normal_class"] for r in rows})
    lines = ["", "## The source research's findings, rechecked", "",
             f"Clean one-class training (all train images of the class), classes {classes}; otherwise as above. "
             "Primary score: T² for the AAE variants, reconstruction error for the AE.", "",
             "| variant | primary AUROC | T² AUROC | recon AUROC | per class (primary) |", "|---|---|---|---|---|"]
    for v in FINDINGS:
        sel = [r for r in rows if r["method"] == v]
        if sel:
            pc = per_class(sel, "auroc")
            lines.append(f"| {v} | {pm(sel, 'auroc')} | {pm(sel, 't2_auroc')} | {pm(sel, 'recon_auroc')} | "
                         + " ".join(f"{c}: {a:.3f}" for c, a in pc.items()) + " |")
    checks = [("AAE vs AE", "aae", "ae"), ("16-dim vs 5-dim latent", "aae_latent16", "aae_latent5"),
              ("32x32 vs 64x64 input", "aae", "aae_input64")]
    lines.append("")
    for name, a, b in checks:
        ra, rb = [r for r in rows if r["method"] == a], [r for r in rows if r["method"] == b]
        if ra and rb:
            pa, pb = per_class(ra, "auroc"), per_class(rb, "auroc")
            both = [c for c in pa if c in pb]
            wins = sum(pa[c] > pb[c] for c in both)
            diff = np.mean([pa[c] - pb[c] for c in both])
            lines.append(f"- {name}: {a} − {b} = {diff:+.3f} mean AUROC; {a} better on {wins} of {len(both)} classes.")
    return lines


def save(out: Path, name: str, doc: dict) -> None:
    """Write NAME.json and NAME.md, each through a temporary file, so a kill never leaves half a file."""
    doc = {**doc, "settings": settings([r for r in doc["runs"] if r["part"] == "protocol"])}
    for suffix, text in ((".json", json.dumps(doc, indent=2) + "\n"), (".md", markdown(doc))):
        tmp = out / f"{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{name}{suffix}")


def cell_key(r: dict) -> tuple:
    return r["part"], r["method"], r["labeled_ratio"], r["normal_class"], r["seed_index"]


def record(args: argparse.Namespace, row: dict | None) -> list[dict]:
    """Add a finished cell to OUT/NAME.json and rewrite the table; return every cell now there.

    Under a file lock, from what is on disk: several processes (say, each with its own --classes) can fill one
    table. Cells of another epoch budget are dropped, since they are not comparable."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    with open(args.out / f"{args.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {"runs": []}
        runs = [r for r in old["runs"] if r["epochs"] == args.epochs]
        if row is not None and cell_key(row) not in {cell_key(r) for r in runs}:
            runs.append(row)
        argv = " ".join(sys.argv[1:])
        invocations = [a for a in old.get("invocations", []) if a != argv] + [argv]
        save(args.out, args.name, doc(args, runs, invocations))
    return runs


# --- the run --------------------------------------------------------------------------------------------------

def cells(args: argparse.Namespace) -> list[tuple[str, str, float, int, int]]:
    """(part, method, labeled ratio, class, seed index) for everything asked for: seed, class, ratio, method."""
    todo = []
    for s in range(args.seeds):
        for k in args.classes:
            for g in args.ratios:
                todo += [("protocol", m, g, k, s) for m in args.methods if not (m == "aae_push" and g == 0)]
    if args.findings:
        todo += [("findings", v, 0.0, k, s) for s in range(args.seeds) for k in args.findings_classes
                 for v in FINDINGS]
    return todo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="*", default=CLASSES_ALL)
    ap.add_argument("--ratios", type=float, nargs="*", default=RATIOS, help="labeled-anomaly ratios")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--epochs", type=int, default=10, help="the same budget for every method")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per cell (config and split seed = 10 x seed + class)")
    ap.add_argument("--findings", action="store_true", help="also run the qualitative checks (clean training)")
    ap.add_argument("--findings-classes", type=int, nargs="*", default=FINDINGS_CLASSES)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="fmnist_methods", help="results go to OUT/NAME.md and OUT/NAME.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads; on 2 cores, two processes with 1 "
                    "thread each and their own --classes finish the AAE-like cells ~1.3x sooner (not AnoGAN's)")
    args = ap.parse_args()

    done = {cell_key(r) for r in record(args, None)}
    todo = [c for c in cells(args) if c not in done]
    print(f"{len(done)} cells already in {args.out / args.name}.json, {len(todo)} to run; {args.epochs} epochs each",
          flush=True)

    start = time.perf_counter()
    data = Data()
    data.X(32)  # resize now, so the first cell's time is the cell's
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    took: dict[str, list[float]] = {}  # method -> seconds of its cells in this run, for the ETA
    for i, (part, method, g, k, s) in enumerate(todo, 1):
        t0 = time.perf_counter()
        seed = 10 * s + k
        if part == "protocol":
            res = protocol_cell(method, g, k, seed, data, args.epochs, args.threads)
        else:
            res = findings_cell(method, k, seed, data, args.epochs, args.threads)
        sec = time.perf_counter() - t0
        took.setdefault(method, []).append(sec)
        record(args, {"part": part, "method": method, "labeled_ratio": g, "normal_class": k, "seed_index": s,
                      "seed": seed, "epochs": args.epochs, **res, "seconds": round(sec, 1), "threads": args.threads,
                      "commit": COMMIT})
        mean_all = np.mean([t for ts in took.values() for t in ts])
        eta = sum(np.mean(took.get(c[1], [mean_all])) for c in todo[i:])
        print(f"[{i}/{len(todo)}] {part} {method} ratio {g} class {k} seed {s}: AUROC {res['auroc']:.4f} "
              f"(T2 {res['t2_auroc']:.4f}) in {sec:.0f} s; elapsed {(time.perf_counter() - start) / 60:.1f} min, "
              f"ETA {eta / 60:.0f} min", flush=True)


def complete(runs: list[dict]) -> bool:
    """Whether the runs hold every cell of the default grid (all methods, classes and ratios, the findings)."""
    have = {(r["part"], r["method"], r["labeled_ratio"], r["normal_class"]) for r in runs}
    every = cells(argparse.Namespace(seeds=1, classes=CLASSES_ALL, ratios=RATIOS, methods=list(METHODS),
                                     findings=True, findings_classes=FINDINGS_CLASSES))
    return all(c[:4] in have for c in every)


def doc(args: argparse.Namespace, runs: list[dict], invocations: list[str]) -> dict:
    wall = sum(r["seconds"] for r in runs)  # over every invocation that added cells, data loading left out
    commits = sorted({r.get("commit", COMMIT) for r in runs})  # a resumed run may span commits
    return {"machine": machine(), "commit": ", ".join(commits), "epochs": args.epochs, "wall_s": round(wall, 1),
            "complete": complete(runs), "classes": sorted({r["normal_class"] for r in runs}),
            "ratios": sorted({r["labeled_ratio"] for r in runs if r["part"] == "protocol"}),
            "seeds": sorted({r["seed_index"] for r in runs}), "pollution": POLLUTION, "cells": len(runs),
            "invocations": invocations,
            "paper": {k: {str(g): v for g, v in ref.items()} for k, ref in PAPER.items()}, "runs": runs}


if __name__ == "__main__":
    main()

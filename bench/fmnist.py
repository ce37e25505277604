"""Fashion-MNIST one-vs-rest benchmark (issue 2): AAE-T2, AAE reconstruction error, AE reconstruction error.

(a) clean one-class training on all 6,000 train images of the normal class;
(b) the Deep SAD protocol (Ruff et al. 2020): pollution 0.1 of unlabeled anomalies from the other classes,
    labeled anomalies from one other class at ratio 0.01 and 0.05, used by anomaly_ratio mixing ("none")
    or by the push term ("push").
Test: the official 10,000-image test split. Also per class: the false-alarm rate on the test normals at
alpha = 0.01 for the F-distribution UCL and for the calibrated limit, and the latent's prior fit.

    python bench/fmnist.py [--epochs 12] [--classes 0 1 ...] [--out bench/results]
Results are rewritten after every class, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aae_ray import scoring
from aae_ray.config import AAEConfig
from aae_ray.data.fashion_mnist import CLASSES, deepsad_split, load_fashion_mnist
from aae_ray.detector import Detector
from aae_ray.diagnostics import prior_fit

POLLUTION = 0.1
LABELED = (0.01, 0.05)


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size), the same bilinear resize the workspace uses."""
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR), np.float32)
                    for im in x])
    return (out / 255.0)[:, None]


def resize32(x: np.ndarray) -> np.ndarray:
    return resize(x, 32)


def run_class(k: int, X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, args: argparse.Namespace
              ) -> list[dict]:
    epochs, trim = args.epochs, args.t2_trim
    test_y = (yt != k).astype(np.int8)
    rows: list[dict] = []

    def evaluate(det: Detector, **setting) -> dict:
        t0 = time.perf_counter()
        s = det.score(Xt)
        score_ips = len(Xt) / (time.perf_counter() - t0)
        row = {**setting, "t2_trim": trim, "normal_class": k, "t2_auroc": scoring.auroc(test_y, s.t2),
               "recon_auroc": scoring.auroc(test_y, s.recon_error),
               "train_images_per_s": float(np.median([h.images_per_s for h in det.history_])),
               "score_images_per_s": score_ips}
        print(f"  class {k} {setting}: T2 {row['t2_auroc']:.4f} recon {row['recon_auroc']:.4f} "
              f"({row['train_images_per_s']:.0f} img/s train, {score_ips:.0f} img/s score)", flush=True)
        return row

    clean = deepsad_split(y, yt, normal_class=k, val_fraction=0.0, seed=k)
    Xc = X[clean.train_normal]
    for family in args.families if "clean" in args.protocols else ():
        cfg = AAEConfig(family=family, epochs=epochs, seed=k, num_threads=2, latent_norm=family == "aae",
                        t2_trim=trim)
        det = Detector(cfg).fit(Xc)
        row = evaluate(det, family=family, protocol="clean", pollution=0.0, labeled_ratio=0.0,
                       defect_loss="none")
        if family == "aae":
            row.update(false_alarms(det, Xc, Xt[test_y == 0]))
        rows.append(row)

    for g in LABELED if "deepsad" in args.protocols else ():
        sp = deepsad_split(y, yt, normal_class=k, pollution=POLLUTION, labeled_ratio=g, val_fraction=0.0, seed=k)
        idx = np.concatenate([sp.pool_normal, sp.pool_anomaly, sp.labeled_anomaly])
        yl = np.r_[np.zeros(len(sp.pool_normal) + len(sp.pool_anomaly)), np.ones(len(sp.labeled_anomaly))]
        for family, loss in (("aae", "none"), ("aae", "push"), ("ae", "none")):
            if family not in args.families:
                continue
            cfg = AAEConfig(family=family, epochs=epochs, seed=k, num_threads=2, anomaly_ratio=g,
                            defect_loss=loss, latent_norm=family == "aae", t2_trim=trim)
            det = Detector(cfg).fit(X[idx], yl.astype(np.int8))
            rows.append(evaluate(det, family=family, protocol="deepsad", pollution=POLLUTION, labeled_ratio=g,
                                 defect_loss=loss))
    return rows


def false_alarms(det: Detector, X_train: np.ndarray, X_normal_test: np.ndarray) -> dict:
    """False-alarm rate on held-out normals at alpha for the F limit (kept as `ucl_f` beside the calibrated
    threshold: both use the same mean and covariance) and for the calibrated limit."""
    t2 = det.score_samples(X_normal_test)
    hot = det.hotelling_
    return {"far_f_ucl": float((t2 > hot.ucl_f).mean()), "far_calibrated": float((t2 > hot.threshold).mean()),
            "ucl_f": hot.ucl_f, "threshold_calibrated": hot.threshold,
            "prior_fit": prior_fit(det.encode(X_train[:5000]), seed=det.config.seed)}


def aggregate(rows: list[dict]) -> list[dict]:
    settings = []
    keys = sorted({(r["family"], r["protocol"], r["pollution"], r["labeled_ratio"], r["defect_loss"]) for r in rows})
    for family, protocol, pollution, g, loss in keys:
        sel = [r for r in rows if (r["family"], r["protocol"], r["pollution"], r["labeled_ratio"],
                                   r["defect_loss"]) == (family, protocol, pollution, g, loss)]
        methods = ["t2", "recon"] if family == "aae" else ["recon"]
        for m in methods:
            vals = {r["normal_class"]: r[f"{m}_auroc"] for r in sel}
            settings.append({"method": f"{family.upper()}-{'T2' if m == 't2' else 'recon'}", "protocol": protocol,
                             "pollution": pollution, "labeled_ratio": g, "defect_loss": loss,
                             "t2_trim": sel[0]["t2_trim"],
                             "mean_auroc": float(np.mean(list(vals.values()))),
                             "std_auroc": float(np.std(list(vals.values()))),
                             "per_class": {str(c): round(v, 4) for c, v in sorted(vals.items())}})
    return settings


def machine() -> str:
    cpu = "unknown cpu"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({device}), python " \
           f"{platform.python_version()}"


def _commit() -> str:
    """The code's commit: $AAE_RAY_COMMIT where the caller names it (a lent GPU machine gets a copy of the
    working tree, whose git, if any, need not be at the commit that travelled), else git's HEAD."""
    if os.environ.get("AAE_RAY_COMMIT"):
        return os.environ["AAE_RAY_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return ""


COMMIT = _commit()


def write(out: Path, name: str, rows: list[dict], epochs: int, wall: float, classes: list[int], done: bool) -> None:
    commit = COMMIT  # the code this run imported, not whatever is checked out when it finishes
    settings = aggregate(rows)
    far = [r for r in rows if "far_f_ucl" in r]
    doc = {"machine": machine(), "commit": commit, "epochs": epochs, "wall_s": round(wall, 1), "complete": done,
           "classes": classes, "settings": settings, "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Fashion-MNIST one-vs-rest ({'complete' if done else 'PARTIAL'})", "",
             f"Machine: {doc['machine']}. Commit {commit}. {epochs} epochs per model, defaults of AAEConfig "
             f"(32x32 input, 3 conv blocks, 32-dim latent; the AE without latent BatchNorm); one seed per class "
             f"(seed = class); T2 trim {rows[0]['t2_trim'] if rows else 0}. Wall time {wall / 60:.1f} min. "
             f"Produced by `python bench/fmnist.py {' '.join(sys.argv[1:])}`.", "",
             "| method | protocol | labeled ratio | defect loss | mean AUROC | std | per class |",
             "|---|---|---|---|---|---|---|"]
    for s in settings:
        per = " ".join(f"{v:.3f}" for v in s["per_class"].values())
        lines.append(f"| {s['method']} | {s['protocol']} | {s['labeled_ratio']} | {s['defect_loss']} | "
                     f"{s['mean_auroc']:.4f} | {s['std_auroc']:.4f} | {per} |")
    if far:
        lines += ["", "False alarms on the test normals at alpha = 0.01 (clean AAE), and the latent's prior fit "
                  "(fresh-discriminator held-out accuracy, 0.5 = indistinguishable from N(0, I)):", "",
                  "| class | F-UCL FAR | calibrated FAR | UCL (F) | calibrated limit | disc acc | mean norm "
                  "| var mean |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in far:
        pf = r["prior_fit"]
        lines.append(f"| {r['normal_class']} {CLASSES[r['normal_class']]} | {r['far_f_ucl']:.4f} | "
                     f"{r['far_calibrated']:.4f} | {r['ucl_f']:.1f} | {r['threshold_calibrated']:.1f} | "
                     f"{pf['fresh_disc_acc']:.3f} | {pf['mean_norm']:.2f} | {pf['var_mean']:.2f} |")
    speed = [r for r in rows if r["family"] == "aae" and r["protocol"] == "clean"]
    if speed:
        lines += ["", f"Speed (clean AAE, median over classes): training "
                      f"{np.median([r['train_images_per_s'] for r in speed]):.0f} images/s, scoring "
                      f"{np.median([r['score_images_per_s'] for r in speed]):.0f} images/s."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    ap.add_argument("--protocols", nargs="*", default=["clean", "deepsad"], choices=["clean", "deepsad"])
    ap.add_argument("--families", nargs="*", default=["aae", "ae"], choices=["aae", "ae"])
    ap.add_argument("--t2-trim", type=float, default=0.0, help="AAEConfig.t2_trim for every model")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="fmnist", help="results go to OUT/NAME.md and OUT/NAME.json")
    args = ap.parse_args()
    start = time.perf_counter()
    xtr, ytr, xte, yte = load_fashion_mnist()
    X, Xt = resize32(xtr), resize32(xte)
    print(f"data ready in {time.perf_counter() - start:.1f} s; {args.epochs} epochs per model", flush=True)
    rows: list[dict] = []
    for k in args.classes:
        t0 = time.perf_counter()
        rows += run_class(k, X, ytr, Xt, yte, args)
        print(f"class {k} ({CLASSES[k]}) done in {time.perf_counter() - t0:.0f} s", flush=True)
        write(args.out, args.name, rows, args.epochs, time.perf_counter() - start, args.classes, done=False)
    write(args.out, args.name, rows, args.epochs, time.perf_counter() - start, args.classes, done=True)


if __name__ == "__main__":
    main()

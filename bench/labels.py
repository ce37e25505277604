"""Labels that teach, thresholds that hold (issue 15): what the workspace's own commands give.

Sections, each resumable cell by cell (a finished cell is saved at once, atomically, under a lock):
  false_alarms  `aae-ray init` + `aae-ray train` (the default config) on a Fashion-MNIST workspace per normal
                class by the Deep SAD protocol (pollution 0.1: the pool hides defects; labeled ratio 0.05), and
                on the synthetic joints of `aae-ray demo`; the false-alarm rate at alpha 0.01 on the test split's
                normals, at the threshold calibrated on known normals only (target: within [0.005, 0.02]), with
                the threshold basis and the number of known normals it was set on.
  deepsad_gain  Fashion-MNIST by the Deep SAD protocol (pollution 0.1 in the pool, labeled anomalies from one
                other class), as a workspace holds it: the pool presumed normal, the val normals (10% of the
                class's train images) known good; the default detector (10 epochs) trained at each labeled ratio
                0, 0.01 and 0.05: the labels enter training (`defect_loss: push`, `anomaly_ratio: all`) and
                `t2_trim: auto`'s estimate. Beside them, the ratio-0 network with the 0.05 labels in its statistics
                only (`stats_only`, the previous default) and with t2_trim 0 (`fixed0`). Per ratio: test AUROC,
                AUROC on the labeled class and on the unseen ones, the estimated and true pollution, FPR/TPR at the
                threshold. The previous default's cells stay in the JSON as gain_cells_stats_only.
  rounds        the active-learning loop through the library's own round (`aae_ray.rounds.run_round`): round 0
                searches; then 3 rounds, each after the simulated labeler answers the first 50 (Fashion-MNIST
                class 0, a 3,000-image pool with 5% hidden defects: bench/active_learning.py's workspace and
                spec) or 20 (the demo's synthetic joints, tune_configs/default.yaml) unlabeled images of the
                latest queue. From one round 0, two copies of the workspace go on: `warm` (round: {search:
                false}, the promoted model fine-tuned on the labels) and `search` (the search beside the warm
                start). Per round: the promoted model's test AUROC, its TPR and FPR at its threshold, the
                round's wall time. A cell is (data, seed); the summary is the median over seeds.
  label_store_s copied from bench/results/label_store.json (bench/label_store.py) when it is there.
Not measured yet where the JSON says null.

    python bench/labels.py [--sections false_alarms rounds] [--cells ...] [--seeds 0 1 2] [--epochs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from active_learning import SPEC as FMNIST_SPEC  # noqa: E402
from active_learning import make_workspace as fmnist_round_workspace  # noqa: E402
from fmnist import POLLUTION, machine  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import artifacts, cli, scoring  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import deepsad_split, load_fashion_mnist  # noqa: E402
from aae_ray.detector import Detector  # noqa: E402
from aae_ray.rounds import answer_queue, run_round  # noqa: E402
from aae_ray.train import train_round  # noqa: E402
from aae_ray.tuning.spec import load_spec, parse_spec  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402

LABELED_RATIO = 0.05
CELLS = [*(f"fmnist{k}" for k in range(10)), "joints"]
ROUND_DATA = {"fmnist": 50, "joints": 20}  # data -> labels answered before each round
N_ROUNDS = 3
DEFAULT_SPEC = Path(__file__).parents[1] / "tune_configs" / "default.yaml"


def workspace(cell: str, folder: Path, seed: int) -> Workspace:
    if cell == "joints":  # what `aae-ray demo` imports
        args = ["--source", "synthetic", "--seed", str(seed), "--n-normal", "800", "--n-defect", "80", "--size", "128"]
    else:
        args = ["--source", "fashion-mnist", "--normal-class", cell.removeprefix("fmnist"), "--pollution",
                str(POLLUTION), "--labeled-anomaly-ratio", str(LABELED_RATIO), "--seed", str(seed)]
    with contextlib.redirect_stdout(io.StringIO()):
        if cli.main(["init", str(folder), *args]) != 0:
            raise RuntimeError(f"aae-ray init failed for {cell}")
    return Workspace.open(folder)


def false_alarm_cell(cell: str, epochs: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace(cell, Path(tmp) / "ws", seed)
        t0 = time.perf_counter()
        m = train_round(ws, AAEConfig(epochs=epochs, seed=seed, num_threads=1), echo=lambda _: None)
    test = m.get("test") or {}
    return {"cell": cell, "seed": seed, "epochs": epochs, "fpr": test.get("fpr"), "tpr": test.get("tpr"),
            "test_auroc": m.get("test_auroc"), "threshold": m["threshold"], "threshold_basis": m["threshold_basis"],
            "n_calibration": m["n_calibration"], "seconds": time.perf_counter() - t0}


GAIN_RATIOS = {"0": 0.0, "0.01": 0.01, "0.05": 0.05}


def gain_cell_arrays(k: int, seed: int, data: tuple) -> tuple:
    """The (class, seed) split, and ratio -> (X, y, known): the pool presumed normal, plus labeled anomalies."""
    x, y, xt, yt = data
    sp = deepsad_split(y, yt, normal_class=k, pollution=POLLUTION, labeled_ratio=max(GAIN_RATIOS.values()),
                       val_fraction=0.1, seed=seed)
    pool = np.concatenate([sp.pool_normal, sp.pool_anomaly])
    n_unlabeled = len(pool)

    def arrays(ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = round(ratio * n_unlabeled / (1 - ratio))  # Deep SAD's gamma_l = m / (n + m)
        idx = np.concatenate([pool, sp.labeled_anomaly[:n]])
        return x[idx], np.r_[np.zeros(len(pool)), np.ones(n)].astype(np.int8), np.zeros(len(idx), dtype=bool)

    return sp, arrays


def gain_cell(k: int, seed: int, epochs: int, data: tuple) -> dict:
    """One (class, seed): the default detector trained at each labeled ratio (labels enter training: pushed out
    of the prior), and beside it the ratio-0 network with the 0.05 labels in its statistics only (`stats_only`,
    the previous default's use of labels) and with t2_trim 0 (`fixed0`)."""
    x, y, xt, yt = data
    sp, arrays = gain_cell_arrays(k, seed, data)
    n_unlabeled = len(sp.pool_normal) + len(sp.pool_anomaly)
    X_cal = x[sp.val_normal]
    anomaly, seen = (yt != k).astype(np.int8), yt == sp.labeled_class
    out = {"class": k, "seed": seed, "epochs": epochs, "labeled_class": sp.labeled_class,
           "true_pollution": len(sp.pool_anomaly) / n_unlabeled, "train_seconds": {}, "ratios": {}}
    cfg = AAEConfig(epochs=epochs, seed=seed, num_threads=1)
    scored = {}
    for name, ratio in GAIN_RATIOS.items():
        t0 = time.perf_counter()
        X, yy, known = arrays(ratio)
        scored[name] = (Detector(cfg).fit(X, yy, known=known, X_calibration=X_cal), yy)
        out["train_seconds"][name] = time.perf_counter() - t0
    base = scored["0"][0]
    for name, ratio, change in (("stats_only", 0.05, {}), ("fixed0", 0.0, {"t2_trim": 0.0})):
        X, yy, known = arrays(ratio)
        scored[name] = (base.rescored(X, yy, known, X_calibration=X_cal, **change), yy)
    for name, (d, yy) in scored.items():
        s = d.score(xt, maps=False)
        c = d.contamination_
        out["ratios"][name] = {
            "n_labeled": int(yy.sum()), "test_auroc": scoring.auroc(anomaly, s.score),
            "seen_auroc": scoring.auroc(anomaly[(yt == k) | seen], s.score[(yt == k) | seen]),
            "unseen_auroc": scoring.auroc(anomaly[~seen], s.score[~seen]), "t2_trim": d.t2_trim_,
            "estimated_pollution": None if c is None else c.share, "defect_pass": None if c is None else c.defect_pass,
            "fpr": float(s.anomaly[yt == k].mean()), "tpr": float(s.anomaly[yt != k].mean())}
    return out


def gain_summary(cells: list[dict]) -> dict | None:
    """mean AUROC per ratio (over classes, each the mean over its seeds), and the paired gain of 0.05 over 0:
    its mean over every (class, seed), and the std over seeds of each seed's mean gain."""
    if not cells:
        return None
    names = list(cells[0]["ratios"])
    all_cells, classes = cells, {c["class"] for c in cells}
    # Like with like: the summary is over the seeds that cover every class; a seed's first few classes wait
    # in the JSON (and in gain_by_seed) until it is complete.
    complete = {s for s in {c["seed"] for c in cells} if {c["class"] for c in cells if c["seed"] == s} == classes}
    cells = [c for c in cells if c["seed"] in complete] or cells
    by_class: dict[int, list[dict]] = {}
    for c in cells:
        by_class.setdefault(c["class"], []).append(c)
    mean = {n: float(np.mean([np.mean([c["ratios"][n]["test_auroc"] for c in cs]) for cs in by_class.values()]))
            for n in names}
    gains: dict[int, list[float]] = {}
    for c in all_cells:
        gains.setdefault(c["seed"], []).append(c["ratios"]["0.05"]["test_auroc"] - c["ratios"]["0"]["test_auroc"])
    per_seed = [float(np.mean(g)) for s, g in gains.items() if s in complete]
    return {"mean_auroc": {n: mean[n] for n in GAIN_RATIOS}, "baseline_t2_trim_0": mean["fixed0"],
            "stats_only_0.05": mean.get("stats_only"),
            "gain": float(np.mean([c["ratios"]["0.05"]["test_auroc"] - c["ratios"]["0"]["test_auroc"] for c in cells])),
            "gain_std": float(np.std(per_seed)) if len(per_seed) > 1 else None,
            "gain_by_seed": {str(s): {"gain": float(np.mean(g)), "classes": len(g)} for s, g in gains.items()},
            "classes": sorted(by_class), "seeds": sorted({c["seed"] for c in cells}),
            "complete": len(by_class) == 10 and len(complete) >= 3,
            "fpr_at_0.05": {str(k): float(np.mean([c["ratios"]["0.05"]["fpr"] for c in cs]))
                            for k, cs in by_class.items()},
            "mean_unseen_auroc": {n: float(np.mean([c["ratios"][n]["unseen_auroc"] for c in cells])) for n in names},
            "mean_seen_auroc": {n: float(np.mean([c["ratios"][n]["seen_auroc"] for c in cells])) for n in names}}


def model_state(ws: Workspace) -> dict:
    m = artifacts.read_metrics(ws.current_model_dir())
    test = m.get("test") or {}
    return {"test_auroc": m.get("test_auroc"), "tpr": test.get("tpr"), "fpr": test.get("fpr"),
            "round": ws.current()["round"]}


def rounds_cell(data: str, seed: int) -> list[dict]:
    """Round 0 once, then N_ROUNDS labeled rounds on a `warm` and a `search` copy of the workspace: one row each."""
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        if data == "fmnist":
            ws, spec = fmnist_round_workspace(base, 3000, 1000, seed=seed), parse_spec(FMNIST_SPEC, where="bench")
        else:
            ws, spec = workspace("joints", base, seed), load_spec(DEFAULT_SPEC)
        spec = spec.model_copy(update={"searcher": spec.searcher.model_copy(update={"seed": seed})})
        t0 = time.perf_counter()
        run_round(ws, spec, echo=quiet)
        first = {**model_state(ws), "seconds": time.perf_counter() - t0}
        rows = []
        for mode in ("warm", "search"):
            copy = Workspace.open(shutil.copytree(base, Path(tmp) / mode))
            mode_spec = spec.model_copy(update={"round": spec.round.model_copy(update={"search": mode == "search"})})
            states, found, promoted = [first], [], []
            for _ in range(N_ROUNDS):
                batch = answer_queue(copy, ROUND_DATA[data])
                out = run_round(copy, mode_spec, echo=quiet)
                states.append({**model_state(copy), "seconds": out.seconds["total"]})
                found.append(batch.n_defects)
                promoted.append(out.promoted)
                print(f"  {data} seed {seed} {mode} round {out.round_no}: {batch.n_defects}/{len(batch.ids)} defects "
                      f"labeled; {out.reason}; {out.seconds['total']:.0f} s", flush=True)
            rows.append({"data": data, "seed": seed, "mode": mode, "labels_per_round": ROUND_DATA[data],
                         "defects_labeled": found, "promoted": promoted,
                         **{k: [st[k] for st in states] for k in ("test_auroc", "tpr", "fpr", "seconds")}})
    return rows


def record(path: Path, row: dict, meta: dict, section: str = "false_alarm_cells") -> dict:
    keys = {"false_alarm_cells": lambda c: (c["cell"], c["seed"], c["epochs"]),
            "gain_cells": lambda c: (c["class"], c["seed"], c["epochs"]),
            "round_cells": lambda c: (c["data"], c["seed"], c["mode"])}[section]
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {}
        cells = {keys(c): c for c in doc.get(section, [])}
        cells[keys(row)] = row
        doc = finish({**doc, **meta, section: list(cells.values())}, path.parent)
        for suffix, text in ((".json", json.dumps(doc, indent=2) + "\n"), (".md", markdown(doc))):
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path.with_suffix(suffix))
    return doc


def finish(doc: dict, results: Path) -> dict:
    fa = {"fmnist": {}, "joints": None}
    for c in doc.get("false_alarm_cells", []):
        if c["cell"] == "joints":
            fa["joints"] = c["fpr"]
        else:
            fa["fmnist"][c["cell"].removeprefix("fmnist")] = c["fpr"]
    store = results / "label_store.json"
    doc["false_alarms"] = fa
    doc["label_store_s"] = json.loads(store.read_text())["label_store_s"] if store.exists() else None
    doc["deepsad_gain"] = gain_summary(doc.get("gain_cells", []))
    doc["deepsad_gain_stats_only"] = gain_summary(doc.get("gain_cells_stats_only", []))
    doc["rounds"] = rounds_summary(doc.get("round_cells", []))
    return doc


def rounds_summary(cells: list[dict]) -> dict | None:
    """data -> mode -> per-round medians over seeds (the JSON shape the issue asks for, one level per mode)."""
    if not cells:
        return None
    out: dict = {}
    for c in cells:
        out.setdefault(c["data"], {}).setdefault(c["mode"], []).append(c)
    med = lambda rows, k: [float(np.median([r[k][i] for r in rows if r[k][i] is not None]))  # noqa: E731
                           for i in range(len(rows[0][k]))]
    return {data: {mode: {"test_auroc": med(rows, "test_auroc"), "tpr": med(rows, "tpr"), "fpr": med(rows, "fpr"),
                          "seconds": med(rows, "seconds"), "seeds": sorted(r["seed"] for r in rows)}
                   for mode, rows in modes.items()} for data, modes in out.items()}


def markdown(doc: dict) -> str:
    lines = ["# Labels and thresholds (issue 15)", "",
             f"Machine: {doc['machine']}. Produced by `python bench/labels.py`; each section names its commit."]
    lines += false_alarms_markdown(doc)
    lines += gain_markdown(doc)
    lines += rounds_markdown(doc)
    missing = [k for k in ("deepsad_gain", "rounds") if doc.get(k) is None]
    if missing:
        lines += ["", "Not measured yet: " + ", ".join(f"`{k}`" for k in missing) + "."]
    return "\n".join(lines) + "\n"


def false_alarms_markdown(doc: dict) -> list[str]:
    cells = doc.get("false_alarm_cells", [])
    if not cells:
        return []
    commits = sorted({c.get("commit", doc.get("commit", "?")) for c in cells})
    lines = ["", "## False alarms at alpha 0.01 on the test split's normals", "",
             f"Commit {', '.join(commits)}. `aae-ray init` + `aae-ray train` (default config, {doc['epochs']} epochs). "
             f"Fashion-MNIST by the Deep SAD protocol: pollution {POLLUTION} in the pool (hidden defects), "
             f"labeled-anomaly ratio {LABELED_RATIO}; the joints as in `aae-ray demo` (synthetic). The threshold "
             "comes from known normals only (a share of the train split's known-good images and the val normals). "
             "Target: [0.005, 0.02].", "",
             "| data | FPR | TPR | test AUROC | threshold basis | known normals | s |", "|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: CELLS.index(c["cell"])):
        lines.append(f"| {c['cell']} | {c['fpr']:.4f} | {c['tpr']:.3f} | {c['test_auroc']:.3f} | "
                     f"{c['threshold_basis']} | {c['n_calibration']} | {c['seconds']:.0f} |")
    fprs = [c["fpr"] for c in cells if c["fpr"] is not None]
    inside = sum(0.005 <= f <= 0.02 for f in fprs)
    return lines + ["", f"{inside} of {len(fprs)} inside [0.005, 0.02]; range {min(fprs):.4f}-{max(fprs):.4f}."]


def gain_markdown(doc: dict) -> list[str]:
    lines = gain_section(doc.get("deepsad_gain"), doc.get("gain_cells", []),
                         "The default detector (labels in training, pushed out of the prior: `defect_loss: push`, "
                         "`anomaly_ratio: all`; t2_trim auto), trained once per (class, seed, ratio); the pool "
                         "presumed normal, the val normals known. `stats_only`: the ratio-0 network with the 0.05 "
                         "labels in its statistics only (t2_trim auto's estimate, the previous default's use of "
                         "labels); `fixed0`: the ratio-0 network with t2_trim 0.")
    return lines + gain_section(doc.get("deepsad_gain_stats_only"), doc.get("gain_cells_stats_only", []),
                                "Before: the previous default (`anomaly_ratio: 0`, labels in the statistics only), "
                                "one training per (class, seed) rescored at each ratio. `fixed0`: t2_trim 0.",
                                "before, labels in the statistics only")


def gain_section(g: dict | None, cells: list[dict], how: str, title: str = "the default") -> list[str]:
    if not g:
        return []
    names = list(cells[0]["ratios"])
    std = "n/a (one seed covers every class)" if g["gain_std"] is None else f"{g['gain_std']:.4f}"
    mean = {**g["mean_auroc"], "fixed0": g["baseline_t2_trim_0"], "stats_only": g.get("stats_only_0.05")}
    lines = ["", f"## Labels raising AUROC: Fashion-MNIST, Deep SAD protocol (pollution 0.1), {title}", "",
             "Summarised over the seeds that cover every class; every cell is in the per-class table.", "",
             f"Commit {', '.join(sorted({c['commit'] for c in cells}))}. Classes {g['classes']}, seeds {g['seeds']}"
             + ("" if g["complete"] else " (**incomplete**: the issue asks for 10 classes x 3 seeds)") + ". "
             f"{cells[0]['epochs']} epochs. " + how, "",
             "| labeled ratio | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| mean test AUROC | " + " | ".join(f"{mean[n]:.4f}" for n in names) + " |",
             "| mean AUROC on the labeled class | " + " | ".join(f"{g['mean_seen_auroc'][n]:.4f}" for n in names)
             + " |",
             "| mean AUROC on the unseen classes | " + " | ".join(f"{g['mean_unseen_auroc'][n]:.4f}" for n in names)
             + " |", "",
             f"Paired gain of ratio 0.05 over 0: **{g['gain']:+.4f}** (std over seeds {std}; by seed: " + ", ".join(
                 f"{s}: {v['gain']:+.4f} over {v['classes']} classes" for s, v in g["gain_by_seed"].items())
             + "); target >= +0.02. "
             "False alarms at alpha 0.01 on the test normals, ratio 0.05: " + ", ".join(
                 f"{k}: {v:.4f}" for k, v in sorted(g["fpr_at_0.05"].items())) + ".", "",
             "| class | seed | labeled class | true pollution | " + " | ".join(
                 f"{n}: AUROC / seen / unseen / trim" for n in names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for c in sorted(cells, key=lambda c: (c["class"], c["seed"])):
        lines.append(f"| {c['class']} | {c['seed']} | {c['labeled_class']} | {c['true_pollution']:.3f} | " + " | ".join(
            f"{r['test_auroc']:.4f} / {r['seen_auroc']:.3f} / {r['unseen_auroc']:.3f} / {r['t2_trim']:.3f}"
            for r in c["ratios"].values()) + " |")
    return lines


def rounds_markdown(doc: dict) -> list[str]:
    summary = doc.get("rounds")
    if not summary:
        return []
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", "## Rounds: the promoted model by round (median over seeds)", "",
             f"Commit: {doc.get('round_commit')}.", "",
             f"`aae_ray.rounds.run_round` after the simulated labeler answers the latest queue ({ROUND_DATA['fmnist']} "
             f"labels a round on Fashion-MNIST class 0, pool 3,000 with 5% hidden defects; {ROUND_DATA['joints']} "
             "on the synthetic joints). Round 0 searches; `warm` rounds fine-tune the promoted model on the labels "
             "(round: {search: false}); `search` rounds search beside it. Promotion: the paired bootstrap interval of "
             "the AUROC difference on the judging set above zero.", "",
             "| data | mode | seeds | test AUROC r0 → r3 | TPR at threshold r0 → r3 | FPR r0 → r3 | seconds a round |",
             "|---|---|---|---|---|---|---|"]
    for data, modes in summary.items():
        for mode, m in modes.items():
            lines.append(f"| {data} | {mode} | {len(m['seeds'])} | {' → '.join(map(fmt, m['test_auroc']))} | "
                         f"{' → '.join(map(fmt, m['tpr']))} | {' → '.join(map(fmt, m['fpr']))} | "
                         f"{' / '.join(f'{s:.0f}' for s in m['seconds'])} |")
    lines += ["", "Per seed:", "", "| data | mode | seed | test AUROC | TPR | defects labeled | promoted |",
              "|---|---|---|---|---|---|---|"]
    for c in sorted(doc.get("round_cells", []), key=lambda c: (c["data"], c["mode"], c["seed"])):
        lines.append(f"| {c['data']} | {c['mode']} | {c['seed']} | {' → '.join(map(fmt, c['test_auroc']))} | "
                     f"{' → '.join(map(fmt, c['tpr']))} | {c['defects_labeled']} | {c['promoted']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["false_alarms", "deepsad_gain", "rounds"],
                    choices=["false_alarms", "deepsad_gain", "rounds"])
    ap.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="deepsad_gain: normal classes")
    ap.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS, help="false_alarms: which data sets")
    ap.add_argument("--rounds-data", nargs="+", default=list(ROUND_DATA), choices=list(ROUND_DATA))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="false_alarms: [0]; rounds: give 0 1 2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "labels.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "commit": commit, "epochs": args.epochs}
    if "false_alarms" in args.sections:
        done = {(c["cell"], c["seed"], c["epochs"]) for c in doc.get("false_alarm_cells", [])}
        todo = [(c, s) for s in args.seeds for c in args.cells if (c, s, args.epochs) not in done]
        print(f"false_alarms: {len(done)} cells done, {len(todo)} to run", flush=True)
        for i, (cell, seed) in enumerate(todo, 1):
            row = false_alarm_cell(cell, args.epochs, seed)
            record(path, {**row, "commit": commit}, meta)
            print(f"[{i}/{len(todo)}] {cell}: FPR {row['fpr']:.4f}, TPR {row['tpr']:.3f}, AUROC "
                  f"{row['test_auroc']:.3f}, {row['threshold_basis']} on {row['n_calibration']} "
                  f"({row['seconds']:.0f} s)",
                  flush=True)
    if "deepsad_gain" in args.sections:
        done = {(c["class"], c["seed"], c["epochs"]) for c in doc.get("gain_cells", [])}
        todo = [(k, s) for s in args.seeds for k in args.classes if (k, s, args.epochs) not in done]
        print(f"deepsad_gain: {len(done)} cells done, {len(todo)} to run", flush=True)
        if todo:
            from fmnist import resize

            x, y, xt, yt = load_fashion_mnist()
            data = (resize(x, 32), y, resize(xt, 32), yt)
        for i, (k, seed) in enumerate(todo, 1):
            row = gain_cell(k, seed, args.epochs, data)
            record(path, {**row, "commit": commit}, {"machine": meta["machine"]}, "gain_cells")
            r = row["ratios"]
            print(f"[{i}/{len(todo)}] class {k} seed {seed}: AUROC " + ", ".join(
                f"{n} {v['test_auroc']:.4f} (trim {v['t2_trim']:.3f})" for n, v in r.items()) +
                f"; true pollution {row['true_pollution']:.3f} ({sum(row['train_seconds'].values()):.0f} s)",
                flush=True)
    if "rounds" in args.sections:
        import ray

        done = {(c["data"], c["seed"]) for c in doc.get("round_cells", [])}
        todo = [(d, s) for s in args.seeds for d in args.rounds_data if (d, s) not in done]
        print(f"rounds: {len(done)} cells done, {len(todo)} to run", flush=True)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        for data, seed in todo:
            for row in rounds_cell(data, seed):
                doc = record(path, row, {"machine": meta["machine"], "round_commit": commit}, "round_cells")
            print(f"rounds {data} seed {seed}: {json.dumps(doc['rounds'][data])}", flush=True)
    print(json.dumps({k: json.loads(path.read_text()).get(k) for k in ("false_alarms", "rounds")}), file=sys.stderr)


if __name__ == "__main__":
    main()

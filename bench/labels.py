"""Labels that teach, thresholds that hold (issue 15): what the workspace's own commands give.

Sections, each resumable cell by cell (a finished cell is saved at once, atomically, under a lock):
  false_alarms  `aae-ray init` + `aae-ray train` (the default config) on a Fashion-MNIST workspace per normal
                class by the Deep SAD protocol (pollution 0.1: the pool hides defects; labeled ratio 0.05), and
                on the synthetic joints of `aae-ray demo`; the false-alarm rate at alpha 0.01 on the test split's
                normals, at the threshold calibrated on known normals only (target: within [0.005, 0.02]), with
                the threshold basis and the number of known normals it was set on.
  label_store_s copied from bench/results/label_store.json (bench/label_store.py) when it is there.
Not measured yet (the JSON says so): deepsad_gain, rounds.

    python bench/labels.py [--classes 0 1 ...] [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import POLLUTION, machine  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import cli  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.workflow import train_round  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402

LABELED_RATIO = 0.05
CELLS = [*(f"fmnist{k}" for k in range(10)), "joints"]


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
        m = train_round(ws, AAEConfig(epochs=epochs, seed=seed, num_threads=2), echo=lambda _: None)
    test = m.get("test") or {}
    return {"cell": cell, "seed": seed, "epochs": epochs, "fpr": test.get("fpr"), "tpr": test.get("tpr"),
            "test_auroc": m.get("test_auroc"), "threshold": m["threshold"], "threshold_basis": m["threshold_basis"],
            "n_calibration": m["n_calibration"], "seconds": time.perf_counter() - t0}


def record(path: Path, row: dict, meta: dict) -> dict:
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {}
        cells = {(c["cell"], c["seed"], c["epochs"]): c for c in doc.get("false_alarm_cells", [])}
        cells[(row["cell"], row["seed"], row["epochs"])] = row
        doc = finish({**doc, **meta, "false_alarm_cells": list(cells.values())}, path.parent)
        for suffix, text in ((".json", json.dumps(doc, indent=2) + "\n"), (".md", markdown(doc))):
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path.with_suffix(suffix))
    return doc


def finish(doc: dict, results: Path) -> dict:
    fa = {"fmnist": {}, "joints": None}
    for c in doc["false_alarm_cells"]:
        if c["cell"] == "joints":
            fa["joints"] = c["fpr"]
        else:
            fa["fmnist"][c["cell"].removeprefix("fmnist")] = c["fpr"]
    store = results / "label_store.json"
    doc["false_alarms"] = fa
    doc["label_store_s"] = json.loads(store.read_text())["label_store_s"] if store.exists() else None
    doc.setdefault("deepsad_gain", None)  # not measured yet
    doc.setdefault("rounds", None)  # not measured yet
    return doc


def markdown(doc: dict) -> str:
    lines = ["# Labels and thresholds (issue 15)", "",
             f"Machine: {doc['machine']}. Commit: {doc['commit']}. Produced by `python bench/labels.py`.", "",
             "## False alarms at alpha 0.01 on the test split's normals", "",
             f"`aae-ray init` + `aae-ray train` (default config, {doc['epochs']} epochs). Fashion-MNIST by the Deep "
             f"SAD protocol: pollution {POLLUTION} in the pool (hidden defects), labeled-anomaly ratio "
             f"{LABELED_RATIO}; the joints as in `aae-ray demo` (synthetic). The threshold comes from known "
             "normals only (a share of the train split's known-good images and the val normals). Target: "
             "[0.005, 0.02].", "",
             "| data | FPR | TPR | test AUROC | threshold basis | known normals | s |", "|---|---|---|---|---|---|---|"]
    for c in sorted(doc["false_alarm_cells"], key=lambda c: CELLS.index(c["cell"])):
        lines.append(f"| {c['cell']} | {c['fpr']:.4f} | {c['tpr']:.3f} | {c['test_auroc']:.3f} | "
                     f"{c['threshold_basis']} | {c['n_calibration']} | {c['seconds']:.0f} |")
    fprs = [c["fpr"] for c in doc["false_alarm_cells"] if c["fpr"] is not None]
    inside = sum(0.005 <= f <= 0.02 for f in fprs)
    lines += ["", f"{inside} of {len(fprs)} inside [0.005, 0.02]; range {min(fprs):.4f}-{max(fprs):.4f}.", "",
              "Not measured yet: `deepsad_gain` (labels raising AUROC) and `rounds` (AUROC by round)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "labels.json"
    done = {(c["cell"], c["seed"], c["epochs"]) for c in
            (json.loads(path.read_text()).get("false_alarm_cells", []) if path.exists() else [])}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": machine(), "commit": commit, "epochs": args.epochs}
    todo = [c for c in args.cells if (c, args.seed, args.epochs) not in done]
    print(f"{len(done)} cells done, {len(todo)} to run", flush=True)
    for i, cell in enumerate(todo, 1):
        row = false_alarm_cell(cell, args.epochs, args.seed)
        record(path, row, meta)
        print(f"[{i}/{len(todo)}] {cell}: FPR {row['fpr']:.4f}, TPR {row['tpr']:.3f}, AUROC {row['test_auroc']:.3f}, "
              f"{row['threshold_basis']} on {row['n_calibration']} ({row['seconds']:.0f} s)", flush=True)
    print(json.dumps(json.loads(path.read_text())["false_alarms"]), file=sys.stderr)


if __name__ == "__main__":
    main()

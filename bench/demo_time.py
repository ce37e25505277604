"""`aae-ray demo` from an empty workspace: its wall time and what its promoted model reaches (issue 14 targets:
<= 3 minutes here, test AUROC >= 0.97). One run per call; `--runs N` repeats it and reports each and the median.

    python bench/demo_time.py [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import machine  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import artifacts  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402


def one_run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws_dir = Path(tmp) / "demo"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aae_ray.cli", "demo", str(ws_dir)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        ws = Workspace.open(ws_dir)
        m = artifacts.read_metrics(ws.current_model_dir())
        return {"seconds": seconds, "promoted_round": ws.current()["round"], "test_auroc": m["test_auroc"],
                "tpr": m["test"]["tpr"], "fpr": m["test"]["fpr"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    med = {k: float(np.median([r[k] for r in runs])) for k in ("seconds", "test_auroc", "tpr", "fpr")}
    doc = {"machine": machine(), "commit": commit, "runs": runs, "median": med}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# `aae-ray demo` from an empty workspace", "", f"Machine: {doc['machine']}. Commit: {commit}. "
             "Produced by `python bench/demo_time.py`. Targets (issue 14): <= 180 s, test AUROC >= 0.97.", "",
             "| run | seconds | promoted round | test AUROC | TPR at threshold | FPR at threshold |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['seconds']:.0f} | {r['promoted_round']} | {r['test_auroc']:.4f} | {r['tpr']:.3f} | "
                     f"{r['fpr']:.3f} |")
    lines.append(f"| median | {med['seconds']:.0f} | | {med['test_auroc']:.4f} | {med['tpr']:.3f} | {med['fpr']:.3f} |")
    (args.out / "demo.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

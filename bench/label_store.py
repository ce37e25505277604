"""How fast the label store reads as it grows (issue 15 target: current labels and the page's history in
<= 0.3 s with 100,000 events).

A store of N events is built the way the labeling page builds it (appends of `--per-append` events: the grid
saves 12 at a time, a card 1), with compaction on (the default) and, as the baseline in the same run, off
(`COMPACT_AT` out of reach: every append stays its own fragment, as before compaction existed). For each store:
`cold`: a fresh process reads `current_labels` and `history(limit=50)` (what the page does on its first run);
`rerun`: the same process after one more single-event append (what the page does after an answer).
Medians of `--repeats`. Writes bench/results/label_store.{md,json}; the `label_store_s` entry is what
bench/results/labels.json takes.

    python bench/label_store.py [--sizes 1000 10000 100000] [--baseline-max 10000] [--repeats 3]
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

from aae_ray import labels  # noqa: E402

READ = """
import sys, time
from pathlib import Path
from aae_ray import labels
folder = Path(sys.argv[1])
if sys.argv[2] == "off":
    labels.COMPACT_AT = 10**12
def page():
    t0 = time.perf_counter()
    labels.current_labels(folder)
    labels.history(folder, limit=50)
    return time.perf_counter() - t0
cold = page()
labels.append(folder, [labels.LabelEvent("rerun-probe", "defect", "bench", 0)])
print(cold, page())
"""


def build(folder: Path, n: int, per_append: int, compaction: bool) -> float:
    labels.COMPACT_AT = 64 if compaction else 10**12
    t0 = time.perf_counter()
    for start in range(0, n, per_append):
        labels.append(folder, [labels.LabelEvent(f"img-{(start + k) % (n // 2 + 1)}", ("defect", "normal")[k % 2],
                                                 "bench", 0, 1.0) for k in range(min(per_append, n - start))])
    return time.perf_counter() - t0


def read_times(folder: Path, compaction: bool, repeats: int) -> dict[str, float]:
    cold, rerun = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", READ, str(folder), "on" if compaction else "off"],
                             capture_output=True, text=True, check=True).stdout.split()
        cold.append(float(out[0]))
        rerun.append(float(out[1]))
    return {"cold_s": float(np.median(cold)), "rerun_s": float(np.median(rerun))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--baseline-max", type=int, default=10_000, help="largest store built without compaction")
    ap.add_argument("--per-append", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        for compaction in (True, False):
            if not compaction and n > args.baseline_max:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "labels"
                build_s = build(folder, n, args.per_append, compaction)
                files = len(list(folder.glob("*.parquet")))
                row = {"events": n, "compaction": compaction, "files": files, "build_s": build_s,
                       **read_times(folder, compaction, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    on = {str(r["events"]): r["rerun_s"] for r in rows if r["compaction"]}
    doc = {"machine": machine(), "commit": commit, "per_append": args.per_append, "repeats": args.repeats,
           "rows": rows, "label_store_s": on}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_store.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Label store read times", "", f"Machine: {doc['machine']}. Commit: {commit}. Stores built by appends "
             f"of {args.per_append} events; `cold` is a fresh process reading `current_labels` + `history(limit=50)`, "
             "`rerun` the same process after one more answer (the labeling page's rerun). Median of "
             f"{args.repeats}. Produced by `python bench/label_store.py`.", "",
             "| events | compaction | files | build s | cold read s | rerun read s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['events']:,} | {'on' if r['compaction'] else 'off (baseline)'} | {r['files']:,} | "
                     f"{r['build_s']:.1f} | {r['cold_s']:.3f} | {r['rerun_s']:.3f} |")
    lines += ["", "Target (issue 15): <= 0.3 s for a page rerun with 100,000 events."]
    (args.out / "label_store.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

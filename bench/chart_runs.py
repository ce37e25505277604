"""Run lengths of the monitor's drift chart (issue 17): designed (Markov chain, aae_ray.control_chart) against
measured, in control and shifted. `bench/line.py` puts them in bench/results/line.{md,json}; alone:

    python bench/chart_runs.py [--runs 4000]

Three measurements:
1. `simulated`: standard normal streams (the chart's own assumption), for three designs of in-control ARL 500,
   in control and shifted by 0.5, 1 and 2 standard deviations.
2. `calibration`: what the chart sees in aae-ray: normal scores from the ranks among m calibration scores of a
   skewed score (chi-square, 32 degrees of freedom, like a T2). Over fresh calibration sets the in-control ARL is
   the design's; for one fixed set it is not (its quantiles are estimates), so the spread over 20 sets of m = 100,
   200 and 1000 is reported: how many calibration normals make the stated false-alarm rate hold for a given model.
3. `planted`: a model trained on the synthetic joints; the line's normal images are made brighter by 0.05, 0.1,
   0.2 and 0.3 (of the full range); each stream is a resample of their normal scores. The measured shift (in the
   chart's standard deviations), the ARL designed for that shift and the measured ARL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aae_ray import control_chart as cc

DESIGNS = ((0.05, 500.0), (0.1, 500.0), (0.2, 500.0))
SHIFTS = (0.0, 0.5, 1.0, 2.0)


def simulated(runs: int, seed: int) -> list[dict]:
    rows = []
    for lam, arl0 in DESIGNS:
        d = cc.design_ewma(lam, arl0)
        for k, shift in enumerate(SHIFTS):
            rl = cc.simulate_run_lengths(d, shift, runs=runs, seed=seed + k)
            rows.append({"lam": lam, "L": d.L, "shift": shift, "designed": d.arl(shift), "measured": float(rl.mean()),
                         "se": float(rl.std() / np.sqrt(runs)), "ratio": float(rl.mean() / d.arl(shift))})
    return rows


def calibration(runs: int, seed: int, sets: int = 20) -> list[dict]:
    d = cc.design_ewma(0.1, 500.0)
    rng = np.random.default_rng(seed)
    rows = []
    for m in (100, 200, 1000):
        per_set = []
        for s in range(sets):
            cal = rng.chisquare(32, m)
            draw = lambda r, shape, cal=cal: cc.normal_scores(r.chisquare(32, shape), cal)  # noqa: E731
            per_set.append(cc.simulate_run_lengths(d, 0.0, runs=max(200, runs // 10), seed=seed + 100 * m + s,
                                                   draw=draw).mean())
        per_set = np.array(per_set)
        rows.append({"m": m, "designed": d.arl(0.0), "mean_over_sets": float(per_set.mean()),
                     "median": float(np.median(per_set)), "p10": float(np.percentile(per_set, 10)),
                     "p90": float(np.percentile(per_set, 90))})
    return rows


def planted(runs: int, seed: int, brightness=(0.05, 0.1, 0.2, 0.3)) -> dict:
    """Train on the synthetic joints, then brighten the normal images the model has not seen."""
    import torch

    from aae_ray import artifacts
    from aae_ray.cli import main as cli
    from aae_ray.dataset import labeled_arrays
    from aae_ray.workspace import Workspace

    torch.manual_seed(seed)
    root = Path(tempfile.mkdtemp(prefix="chart-runs-")) / "ws"
    t0 = time.perf_counter()
    assert cli(["init", str(root), "--source", "synthetic", "--n-normal", "3000", "--n-defect", "60",
                "--size", "32"]) == 0
    assert cli(["train", str(root), "--epochs", "8", "--no-progress"]) == 0
    ws = Workspace.open(root)
    det = artifacts.load(ws.current_model_dir())
    test = labeled_arrays(ws, "test", det.config.input_size)
    X = test.X[test.y == 0]
    cal = det.limit_.calibration
    d = cc.design_ewma(0.1, 500.0)
    rows = []
    for b in (0.0, *brightness):
        z = cc.normal_scores(det.score(np.clip(X + b, 0.0, 1.0)).score, cal)
        draw = lambda r, shape, z=z: r.choice(z, size=shape)  # noqa: E731
        rl = cc.simulate_run_lengths(d, 0.0, runs=runs, seed=seed + int(b * 1000), draw=draw)
        shift = float(z.mean())
        rows.append({"brightness": b, "shift_sigma": shift, "sd": float(z.std()), "designed_at_shift": d.arl(shift),
                     "measured": float(rl.mean()), "p90": float(np.percentile(rl, 90))})
    return {"images": int(len(X)), "calibration": int(len(cal)), "threshold_basis": det.limit_.method,
            "train_s": time.perf_counter() - t0, "design": d.to_dict(), "rows": rows}


def run_lengths(runs: int = 4000, seed: int = 0) -> dict:
    return {"simulated": simulated(runs, seed), "calibration": calibration(runs, seed),
            "planted": planted(min(runs, 2000), seed)}


def markdown(r: dict) -> str:
    out = ["### Drift chart run lengths (designed vs measured)", "",
           "Standard normal streams (the design's assumption), in-control ARL 500:", "",
           "| lam | L | shift (sd) | designed ARL | measured ARL (+-se) | measured / designed |",
           "|---|---|---|---|---|---|"]
    out += [f"| {x['lam']:g} | {x['L']:.3f} | {x['shift']:g} | {x['designed']:.1f} | {x['measured']:.1f} "
            f"(+-{x['se']:.1f}) | {x['ratio']:.3f} |" for x in r["simulated"]]
    out += ["", "In control through aae-ray's normal scores (ranks among m calibration scores of a chi-square(32) "
            "score), lam 0.1, ARL0 500; ARL of one fixed calibration set, over 20 sets:", "",
            "| m | designed | mean over sets | median | 10%..90% |", "|---|---|---|---|---|"]
    out += [f"| {x['m']} | {x['designed']:.0f} | {x['mean_over_sets']:.0f} | {x['median']:.0f} | "
            f"{x['p10']:.0f}..{x['p90']:.0f} |" for x in r["calibration"]]
    p = r["planted"]
    out += ["", f"Planted drift: brighter synthetic joints ({p['images']} unseen normal test images, threshold "
            f"basis {p['threshold_basis']} on {p['calibration']} normals), lam 0.1, ARL0 500:", "",
            "| brightness | measured shift (sd) | sd of z | designed ARL at that shift | measured ARL | 90% of runs "
            "within |", "|---|---|---|---|---|---|"]
    out += [f"| +{x['brightness']:g} | {x['shift_sigma']:+.2f} | {x['sd']:.2f} | {x['designed_at_shift']:.1f} | "
            f"{x['measured']:.1f} | {x['p90']:.0f} |" for x in p["rows"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    res = run_lengths(a.runs, a.seed)
    print(markdown(res))
    json.dump(res, sys.stdout, indent=1)

"""Active-learning benchmark (issue 4): does labeling the queue find defects, and does AUROC rise by round?

Fashion-MNIST, class 0 normal, 5% hidden defects (other classes) in the unlabeled pool. Round 0 tunes a model
on the pool as presumed normal; then --rounds times the simulated labeler (`oracle`, the import's truth)
answers the first --labels unlabeled images of the latest queue and a round retrains, compares and promotes.

- base_rate: the share of defects in the pool (what random labeling finds);
- defects_in_first_100: defects among round 0's first 100 queue items (highest T2), and that over the base rate;
- queue policies vs random sampling from round 0's model: defects found after each label spent (a plot);
- test_auroc_by_round: the promoted model's test AUROC after round 0 and after each labeled round.

    python bench/active_learning.py [--pool 3000] [--rounds 3] [--labels 50] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)

from aae_ray import artifacts  # noqa: E402
from aae_ray.data.fashion_mnist import fashion_mnist_records  # noqa: E402
from aae_ray.dataset import pool_arrays  # noqa: E402
from aae_ray.learning_curves import plot, policy_curves, pool_truth  # noqa: E402
from aae_ray.rounds import answer_queue, run_round  # noqa: E402
from aae_ray.tuning.spec import parse_spec  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402

SPEC = {
    "num_samples": 6, "max_concurrent": 2, "resources": {"cpu": 1},
    "scheduler": {"asha": True, "grace_period": 2, "reduction_factor": 2},
    "searcher": {"algorithm": "tpe", "n_startup_trials": 4, "seed": 0},
    "report": {"anomaly_ratio_sweep": False},
    "space": {"latent_dim": {"choice": [16, 32]}, "lr": {"loguniform": [3e-4, 3e-3]},
              "anomaly_ratio": {"choice": [0, 0.01, 0.02]}},
    "fixed": {"input_size": 32, "epochs": 5, "batch_size": 128, "t2_trim": 0.05},
}


def make_workspace(root: Path, pool: int, val: int, seed: int = 0) -> Workspace:
    records = fashion_mnist_records(normal_class=0, pollution=0.05, seed=seed)
    rng = np.random.default_rng(seed)
    keep = []
    for split, cap in (("pool", pool), ("val", val), ("test", None), ("train", None)):
        rs = [r for r in records if r.split == split]
        if cap is not None and len(rs) > cap:  # stratified: the pool keeps its 5% of defects
            keep_rs = []
            for t in (0, 1):
                part = [r for r in rs if r.truth == t]
                n = round(cap * len(part) / len(rs))
                keep_rs += [part[i] for i in sorted(rng.permutation(len(part))[:n])]
            rs = keep_rs
        keep += rs
    ws, _ = Workspace.import_records(root, keep, {"source": "fashion-mnist", "normal_class": 0, "pollution": 0.05,
                                                  "bench": "active_learning"}, [])
    return ws


def markdown(doc: dict) -> str:
    lines = ["# Active learning (`python bench/active_learning.py`)", "", f"Machine: {doc['machine']}  ",
             f"Code: {doc['commit']}, {doc['seconds']} s. Fashion-MNIST class 0 normal, a pool of {doc['pool']} "
             f"images with {doc['base_rate']:.1%} hidden defects; tuning spec in the JSON.", "",
             f"- defects in round 0's first 100 queue items: **{doc['defects_in_first_100']}** "
             f"({doc['precision_at_100_over_base']:.1f}x the base rate; random labeling finds "
             f"{doc['random_baseline']['expected_defects_in_100']:.1f}; target >= 10x)",
             "- promoted model's test AUROC by round: **" + " -> ".join(
                 "n/a" if a is None else f"{a:.4f}" for a in doc["test_auroc_by_round"])
             + "** (goal: rises every round)",
             "", "| round | labels | defects labeled | promoted | why |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['labels']} | {r['defects_found']} | {r['promoted']} | {r['reason']} |"
              for r in doc["rounds"]]
    lines += ["", "Defects found after k labels of round 0's queue (policy vs random):", "",
              "| policy | " + " | ".join(f"k={k}" for k in doc["policies_defects_after_labels"]["highest"]) + " |",
              "|---|" + "---|" * len(doc["policies_defects_after_labels"]["highest"])]
    lines += [f"| {p} | " + " | ".join(f"{v:g}" for v in c.values()) + " |"
              for p, c in doc["policies_defects_after_labels"].items()]
    lines += ["", "![defects found and AUROC by round](active_learning.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--labels", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import ray

    start = time.perf_counter()
    spec = parse_spec(SPEC, where="bench spec")
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", args.pool, args.val)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        echo = lambda line: None  # noqa: E731
        print("round 0: tune on the pool as presumed normal", flush=True)
        run_round(ws, spec, echo=echo)
        pool_ids = pool_arrays(ws, 32).ids
        truth = pool_truth(ws, pool_ids)
        base_rate = float(truth.mean())
        queue0 = pq.read_table(ws.round_dir(0) / "scores.parquet").column("id").to_pylist()
        t = dict(zip(pool_ids, truth.tolist(), strict=True))
        first_100 = int(sum(t[i] for i in queue0[:100]))
        curves = policy_curves(ws, args.rounds * args.labels, seed=0)
        aurocs = [artifacts.read_metrics(ws.current_model_dir()).get("test_auroc")]
        rounds = []
        for r in range(1, args.rounds + 1):
            batch = answer_queue(ws, args.labels)
            out = run_round(ws, spec, echo=echo)
            aurocs.append(artifacts.read_metrics(ws.current_model_dir()).get("test_auroc"))
            rounds.append({"round": out.round_no, "labels": len(batch.ids), "defects_found": batch.n_defects,
                           "promoted": out.promoted, "reason": out.reason, "new_model_test_auroc":
                           out.metrics.get("test_auroc"), "current_test_auroc": aurocs[-1]})
            print(f"round {r}: {batch.n_defects}/{len(batch.ids)} defects labeled; {out.reason}; current test "
                  f"AUROC {aurocs[-1]:.4f}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        plot(curves, aurocs, args.out / "active_learning.png")
        doc = {
            "machine": machine(), "commit": COMMIT, "pool": len(pool_ids), "spec": SPEC,
            "base_rate": base_rate, "defects_in_first_100": first_100,
            "precision_at_100_over_base": (first_100 / 100) / base_rate,
            "test_auroc_by_round": aurocs, "rounds": rounds,
            "random_baseline": {"expected_defects_in_100": 100 * base_rate,
                                "defects_after_labels": {str(k): curves["random (mean of 20)"][k - 1]
                                                         for k in (50, 100, 150) if k <= len(curves["highest"])}},
            "policies_defects_after_labels": {p: {str(k): c[k - 1] for k in (50, 100, 150) if k <= len(c)}
                                              for p, c in curves.items()},
            "scoring_images_per_s": None,  # Ray Data vs one process: not measured yet
            "seconds": round(time.perf_counter() - start),
        }
    (args.out / "active_learning.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "active_learning.md").write_text(markdown(doc))
    print(json.dumps({k: doc[k] for k in ("base_rate", "defects_in_first_100", "precision_at_100_over_base",
                                          "test_auroc_by_round")}))


if __name__ == "__main__":
    main()

"""Tuning benchmarks (issue 3), each against a baseline in the same run, on Fashion-MNIST class 0.

1. trial_vs_bare_throughput: training images/s of one config inside a Tune trial over the same training in a
   bare Python process (target >= 0.95). Median over epochs, then over --repeats alternating runs.
2. concurrent_wall_ratio: 8 trials on 2 cores, 2 at once with 1 thread each, over 1 at a time with 2 threads
   (target <= 0.60). Wall time of Tuner.fit, median of --repeats.
3. search_quality: TPE vs random sampling, same space, same budget, same ASHA: best val AUROC after 8, 16 and
   32 trials (median of --seeds seeds) and the test AUROC of each of those winners. Only trials that ran all
   epochs count as winners (an ASHA-stopped trial has no model).

The data: class 0 as normal; --n-train normals to train on (a subset, so that 200 trials fit in an hour on
2 cores), the Deep SAD split's val (capped at --n-val) to tune on, the official test split to report on.

    python bench/tune.py [--parts throughput,concurrency,search] [--repeats 3] [--seeds 3] [--out bench/results]
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
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)

import aae_ray.tuning.runner  # noqa: E402, F401  (sets Tune's environment: quiet output, state saved per event)
from aae_ray import artifacts, scoring  # noqa: E402
from aae_ray.config import AAEConfig  # noqa: E402
from aae_ray.data.fashion_mnist import fashion_mnist_records  # noqa: E402
from aae_ray.dataset import labeled_arrays  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402

SHAPE = {"input_size": 32, "conv_blocks": 3, "latent_dim": 16, "batch_size": 128}
TINY_SHAPE = {"input_size": 32, "conv_blocks": 3, "latent_dim": 8, "batch_size": 64, "base_channels": 8,
              "fc_units": 32}
SEARCH_SPACE = {
    "conv_blocks": {"int": [2, 4]},
    "latent_dim": {"int": [4, 64]},
    "fc_units": {"choice": [0, 128, 256, 512]},
    "lr": {"loguniform": [1e-4, 1e-2]},
    "lr_adv": {"loguniform": [1e-4, 1e-2]},
    "disc_steps": {"int": [1, 3]},
}


def make_workspace(root: Path, n_train: int, n_val: int, seed: int = 0) -> Workspace:
    records = fashion_mnist_records(normal_class=0, seed=seed)
    rng = np.random.default_rng(seed)
    by_split: dict[str, list] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r)
    keep = []
    for split, rs in by_split.items():
        cap = {"train": n_train, "val": n_val}.get(split, len(rs))
        keep += [rs[i] for i in sorted(rng.permutation(len(rs))[:cap])]
    ws, _ = Workspace.import_records(root, keep, {"source": "fashion-mnist", "normal_class": 0, "bench": "tune"}, [])
    return ws


# --- 1. throughput inside a trial vs a bare process ---------------------------------------------------------


def bare_worker(ws_root: Path, epochs: int, threads: int) -> None:
    """Runs in its own process: the same training as a trial, no Ray. Prints the epochs' images/s as JSON."""
    import torch

    from aae_ray.dataset import training_arrays
    from aae_ray.detector import Detector

    torch.set_num_threads(threads)
    data = training_arrays(Workspace.open(ws_root), 32)
    det = Detector(AAEConfig(**SHAPE, epochs=epochs, num_threads=threads)).fit(data.X, data.y)
    print(json.dumps([h.images_per_s for h in det.history_]))


def trial_images_per_s(trainable, epochs: int, threads: int, storage: Path) -> list[float]:
    from ray import tune

    grid = tune.Tuner(
        tune.with_resources(trainable, {"cpu": threads}),
        param_space={**SHAPE, "epochs": epochs, "num_threads": threads},
        run_config=tune.RunConfig(storage_path=str(storage), name=f"tp{time.time_ns()}", verbose=0),
    ).fit()
    path = Path(grid[0].path) / "result.json"
    return [json.loads(line)["images_per_s"] for line in path.read_text().splitlines()]


def throughput(ws: Workspace, trainable, repeats: int, epochs: int, threads: int, tmp: Path) -> dict:
    bare, trial = [], []
    for r in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--bare-worker", str(ws.root), str(epochs), str(threads)],
                             capture_output=True, text=True, check=True)
        bare.append(float(np.median(json.loads(out.stdout.strip().splitlines()[-1])[1:])))  # epoch 1 warms up
        trial.append(float(np.median(trial_images_per_s(trainable, epochs, threads, tmp)[1:])))
        print(f"  throughput run {r + 1}: bare {bare[-1]:,.0f} img/s, trial {trial[-1]:,.0f} img/s", flush=True)
    return {"bare_images_per_s": bare, "trial_images_per_s": trial, "threads": threads, "epochs": epochs,
            "ratio": float(np.median(trial) / np.median(bare))}


# --- 2. two 1-thread trials at once vs one 2-thread trial at a time ----------------------------------------


def concurrency(trainable, repeats: int, epochs: int, tmp: Path, shape: dict) -> dict:
    from ray import tune

    def wall(concurrent: int, threads: int) -> float:
        start = time.perf_counter()
        tune.Tuner(
            tune.with_resources(trainable, {"cpu": threads}),
            param_space={**shape, "epochs": epochs, "num_threads": threads, "seed": tune.grid_search(list(range(8)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp), name=f"cc{time.time_ns()}", verbose=0),
        ).fit()
        return time.perf_counter() - start

    two, one = [], []
    for r in range(repeats):
        two.append(wall(2, 1))
        one.append(wall(1, 2))
        print(f"  concurrency run {r + 1}: 2 at once x 1 thread {two[-1]:.1f} s, 1 at a time x 2 threads "
              f"{one[-1]:.1f} s", flush=True)
    return {"two_concurrent_1_thread_s": two, "one_at_a_time_2_threads_s": one, "trials": 8, "epochs": epochs,
            "shape": shape, "ratio": float(np.median(two) / np.median(one))}


# --- 3. TPE vs random search -------------------------------------------------------------------------------


def search_run(ws: Workspace, algorithm: str, seed: int, n: int, epochs: int, round_no: int) -> list[dict]:
    """One search of n trials; returns each trial in creation order: final metric, whether it finished, model."""
    from aae_ray.tuning.runner import run_tune
    from aae_ray.tuning.spec import parse_spec

    spec = parse_spec({
        "num_samples": n, "max_concurrent": 2, "resources": {"cpu": 1},
        "searcher": {"algorithm": algorithm, "seed": seed, "n_startup_trials": 6},
        "scheduler": {"asha": True, "grace_period": 1, "reduction_factor": 2},
        "report": {"anomaly_ratio_sweep": False}, "space": SEARCH_SPACE,
        "fixed": {"input_size": 32, "epochs": epochs, "batch_size": 128, "seed": seed},
    })
    out = run_tune(ws, spec, round_no=round_no, echo=lambda _: None)
    trials = []
    for folder in out.experiment.glob("train_trial_*"):
        index = int(folder.name.split("_")[3])  # train_trial_<id>_<n>_<params>
        lines = (folder / "result.json").read_text().splitlines() if (folder / "result.json").exists() else []
        last = json.loads(lines[-1]) if lines else {}
        ckpt = sorted(folder.glob("checkpoint_*"))
        trials.append({"index": index, "val_auroc": last.get("val_auroc"), "epochs": last.get("epoch", 0),
                       "model": str(ckpt[-1]) if ckpt else None})
    return sorted(trials, key=lambda t: t["index"])


def search_quality(ws: Workspace, seeds: int, budgets: list[int], epochs: int) -> dict:
    test = labeled_arrays(ws, "test", 32)
    runs: dict[str, list] = {"tpe": [], "random": []}
    round_no = 0
    for seed in range(seeds):
        for algorithm in ("tpe", "random"):
            start = time.perf_counter()
            trials = search_run(ws, algorithm, seed, max(budgets), epochs, round_no)
            round_no += 1
            per_budget = {}
            for k in budgets:
                done = [t for t in trials[:k] if t["model"] and t["val_auroc"] is not None]
                best = max(done, key=lambda t: t["val_auroc"]) if done else None
                test_auroc = (scoring.auroc(test.y, artifacts.load(Path(best["model"])).score_samples(test.X))
                              if best else None)
                per_budget[k] = {"best_val_auroc": best["val_auroc"] if best else None, "test_auroc": test_auroc,
                                 "finished_trials": len(done)}
            runs[algorithm].append({"seed": seed, "seconds": time.perf_counter() - start, "budgets": per_budget})
            print(f"  search {algorithm} seed {seed}: " + ", ".join(
                f"{k}: val {_f(v['best_val_auroc'])} test {_f(v['test_auroc'])}" for k, v in per_budget.items())
                + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = {alg: {k: {"median_best_val_auroc": _median([r["budgets"][k]["best_val_auroc"] for r in rs]),
                         "median_test_auroc": _median([r["budgets"][k]["test_auroc"] for r in rs])}
                     for k in budgets} for alg, rs in runs.items()}
    return {"budgets": budgets, "seeds": seeds, "epochs": epochs, "space": SEARCH_SPACE, "summary": summary,
            "runs": runs}


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# --- the report ---------------------------------------------------------------------------------------------


def write(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Tuning benchmarks (`python bench/tune.py`)", "", f"Machine: {doc['machine']}  ",
             f"Data: Fashion-MNIST class 0 normal, {doc['n_train']} training normals, {doc['n_val']} val images, "
             f"{doc['n_test']} test images.", ""]
    tp = doc.get("trial_vs_bare_throughput_detail")
    if tp:
        lines += ["## Training throughput inside a Tune trial vs a bare process (target >= 0.95)", "",
                  f"{tp['threads']} thread(s), {tp['epochs']} epochs, median of epochs 2+ then of "
                  f"{len(tp['bare_images_per_s'])} alternating runs (code {tp.get('commit')}).", "",
                  "| run | bare img/s | trial img/s |", "|---|---|---|"]
        lines += [f"| {i + 1} | {b:,.0f} | {t:,.0f} |" for i, (b, t) in
                  enumerate(zip(tp["bare_images_per_s"], tp["trial_images_per_s"], strict=True))]
        lines += ["", f"**trial_vs_bare_throughput = {doc['trial_vs_bare_throughput']:.3f}**", ""]
    for key, what in (("concurrent_wall_ratio", "the benchmark AAE"), ("concurrent_wall_ratio_tiny_model",
                                                                          "a tiny AAE")):
        cc = doc.get(f"{key}_detail")
        if not cc:
            continue
        lines += [f"## 8 trials on 2 cores, {what}: 2 at once (1 thread each) vs 1 at a time (2 threads) "
                  "(target <= 0.60)", "", f"Code {cc.get('commit')}, {cc['epochs']} epochs a trial, model "
                  f"{cc.get('shape', SHAPE)}.", "", "| run | 2 x 1 thread (s) | 1 x 2 threads (s) |", "|---|---|---|"]
        lines += [f"| {i + 1} | {a:.1f} | {b:.1f} |" for i, (a, b) in
                  enumerate(zip(cc["two_concurrent_1_thread_s"], cc["one_at_a_time_2_threads_s"], strict=True))]
        lines += ["", f"**{key} = {doc[key]:.3f}**", ""]
    sq = doc.get("search_quality")
    if sq:
        lines += [f"## TPE vs random search ({sq['seeds']} seeds, {sq['epochs']} epochs a trial, ASHA)", "",
                  "Best val AUROC among the first k trials that ran all epochs, and that winner's test AUROC "
                  f"(medians over seeds; code {sq.get('commit')}).", "",
                  "| trials | TPE val | random val | TPE test | random test |", "|---|---|---|---|---|"]
        for k in sq["budgets"]:
            t, r = (sq["summary"][alg].get(k) or sq["summary"][alg][str(k)] for alg in ("tpe", "random"))
            lines.append(f"| {k} | {_f(t['median_best_val_auroc'])} | {_f(r['median_best_val_auroc'])} | "
                         f"{_f(t['median_test_auroc'])} | {_f(r['median_test_auroc'])} |")
        lines.append("")
    (out / "tune.md").write_text("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-worker":
        bare_worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,concurrency,concurrency_tiny,search")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", default="8,16,32")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4, help="epochs a trial (search); throughput/concurrency use 3")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--merge", action="store_true", help="keep the other parts' results already in --out")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    import ray
    from ray import tune

    from aae_ray.tuning.trainable import train_trial
    from aae_ray.tuning.trial_data import build_trial_data

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        ws = make_workspace(tmp / "ws", args.n_train, args.n_val)
        splits = ws.images().column("split").to_pylist()
        # Parts run separately (e.g. the long search in the background, the timings on an idle machine) are
        # merged into one result file; each part records the commit it ran.
        previous = args.out / "tune.json"
        doc: dict = json.loads(previous.read_text()) if previous.exists() and args.merge else {}
        doc.update({"machine": machine(), "n_train": splits.count("train"), "n_val": splits.count("val"),
                    "n_test": splits.count("test")})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        trainable = tune.with_parameters(train_trial, data=build_trial_data(ws, [32]))
        if "throughput" in parts:
            print("1/3 throughput: trial vs bare process", flush=True)
            tp = throughput(ws, trainable, args.repeats, epochs=3, threads=2, tmp=tmp)
            doc["trial_vs_bare_throughput"] = tp["ratio"]
            doc["trial_vs_bare_throughput_detail"] = {**tp, "commit": COMMIT}
            write(args.out, doc)
        if "concurrency" in parts:
            print("2/3 concurrency: 8 trials, 2 x 1 thread vs 1 x 2 threads", flush=True)
            cc = concurrency(trainable, args.repeats, epochs=3, tmp=tmp, shape=SHAPE)
            doc["concurrent_wall_ratio"] = cc["ratio"]
            doc["concurrent_wall_ratio_detail"] = {**cc, "commit": COMMIT}
            write(args.out, doc)
        if "concurrency_tiny" in parts:  # a model too small to keep 2 threads busy: where concurrency pays
            print("2b concurrency, tiny model: 8 trials, 2 x 1 thread vs 1 x 2 threads", flush=True)
            cc = concurrency(trainable, args.repeats, epochs=3, tmp=tmp, shape=TINY_SHAPE)
            doc["concurrent_wall_ratio_tiny_model"] = cc["ratio"]
            doc["concurrent_wall_ratio_tiny_model_detail"] = {**cc, "commit": COMMIT}
            write(args.out, doc)
        if "search" in parts:
            print("3/3 search quality: TPE vs random", flush=True)
            doc["search_quality"] = {**search_quality(ws, args.seeds, [int(b) for b in args.budgets.split(",")],
                                                      args.epochs), "commit": COMMIT}
        doc[f"seconds_{'_'.join(sorted(parts))}"] = round(time.perf_counter() - start)
        write(args.out, doc)
    print(json.dumps({k: doc.get(k) for k in ("trial_vs_bare_throughput", "concurrent_wall_ratio")}))


if __name__ == "__main__":
    main()

"""What labeling buys, measured against the import's truth: for `aae-ray simulate` and bench/active_learning.py.

    doc = simulate(ws, spec, rounds=3, labels_per_round=50)   # aae-ray simulate: rounds answered by the truth
    curves = policy_curves(ws, budget=150)     # defects found after each label, every queue policy vs random
    plot(curves, aurocs, path, found=found)    # the report figure: those curves, and AUROC by round

Only workspaces whose import knew the truth (synthetic, Fashion-MNIST) can be measured this way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from aae_ray import artifacts
from aae_ray.dataset import pool_arrays
from aae_ray.formatting import metric
from aae_ray.queue import POLICIES, queue_order
from aae_ray.workspace import Workspace, write_text

N_RANDOM = 20  # random orders averaged for the random-sampling baseline


def pool_truth(ws: Workspace, ids: list[str]) -> np.ndarray:
    table = pq.read_table(ws.images_path, columns=["id", "truth"])  # not the image bytes
    t = dict(zip(table.column("id").to_pylist(), table.column("truth").to_pylist(), strict=True))
    unknown = [i for i in ids if t.get(i) is None]
    if unknown:
        raise ValueError(f"{len(unknown)} pool images have no known truth (e.g. {unknown[0]}): learning curves "
                         "need a synthetic or fashion-mnist workspace")
    return np.array([t[i] for i in ids], dtype=np.int8)


def policy_curves(ws: Workspace, budget: int, seed: int = 0) -> dict[str, list[float]]:
    """Cumulative defects found after each of `budget` labels, labeling the promoted model's queue in each
    policy's order, and the mean over N_RANDOM random orders (what labeling without a model finds)."""
    det = artifacts.load(ws.current_model_dir())
    pool = pool_arrays(ws, det.config.input_size)
    truth = pool_truth(ws, pool.ids)
    scores = det.score(pool.X)
    codes = det.encode(pool.X)
    curves: dict[str, list[float]] = {
        p: np.cumsum(truth[queue_order(scores.score, codes, det.threshold_, p)][:budget]).astype(float).tolist()
        for p in POLICIES}
    rng = np.random.default_rng(seed)
    draws = [np.cumsum(truth[rng.permutation(len(truth))][:budget]) for _ in range(N_RANDOM)]
    curves[f"random (mean of {N_RANDOM})"] = np.mean(draws, axis=0).tolist()
    return curves


def plot(curves: dict[str, list[float]], aurocs: list[float | None], path: Path,
         found: list[int] | None = None) -> Path:
    """Left: defects found vs labels spent (each curve; `found`, the simulated labeler's real path through
    queues re-scored every round, drawn bold). Right: the promoted model's test AUROC after each round."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100, layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    for name, c in curves.items():
        ax1.plot(np.arange(1, len(c) + 1), c, label=f"{name} (one queue)")
    if found:
        ax1.plot(np.arange(1, len(found) + 1), np.cumsum(found), color="black", linewidth=2,
                 label="labeled (queue re-scored each round)")
    ax1.set(xlabel="labels spent", ylabel="defects found", title="Defects found vs labels spent")
    ax1.legend(fontsize="small")
    ax2.plot(range(len(aurocs)), [np.nan if a is None else a for a in aurocs], marker="o")
    ax2.set(xlabel="round", ylabel="test AUROC", title="Promoted model's test AUROC by round")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def simulate(ws: Workspace, spec, *, rounds: int, labels_per_round: int, address: str | None = None,
             policy: str = "highest", echo: Callable[[str], None] = print) -> dict:
    """`rounds` times: an oracle answers the first `labels_per_round` unlabeled images of the latest queue from
    the import's truth, then a round runs (`aae_ray.rounds.run_round`). The report (defects found, the promoted
    model's test AUROC by round, every policy's curve against random labeling) is written to
    WS/report/active_learning.{json,png} and returned, with the figure's path under "plot"."""
    from aae_ray.rounds import answer_queue, latest_queue, run_round

    if rounds < 1 or labels_per_round < 1:
        raise ValueError("--rounds and --labels-per-round must be at least 1")
    if latest_queue(ws) is None:
        echo("no queue yet: a first round tunes a model and scores the pool")
        run_round(ws, spec, address=address, policy=policy, echo=echo)
    curves = policy_curves(ws, rounds * labels_per_round)
    aurocs = [artifacts.read_metrics(ws.current_model_dir()).get("test_auroc")]
    found: list[int] = []
    done = []
    for i in range(1, rounds + 1):
        batch = answer_queue(ws, labels_per_round)
        found += [int(d) for d in batch.defects]
        echo(f"== simulated labels {i}/{rounds}: oracle labeled {len(batch.ids)} of round {batch.round_no}'s "
             f"queue, {batch.n_defects} defects ({batch.n_left} unlabeled left)")
        out = run_round(ws, spec, address=address, policy=policy, echo=echo)
        aurocs.append(artifacts.read_metrics(ws.current_model_dir()).get("test_auroc"))
        done.append({"round": out.round_no, "labels": len(batch.ids), "defects": batch.n_defects,
                     "promoted": out.promoted, "reason": out.reason, "test_auroc": aurocs[-1]})
        echo(f"   round {out.round_no}: {'promoted' if out.promoted else 'kept'} ({out.reason}); current model's "
             f"test AUROC {metric(aurocs[-1])}")
    report = ws.root / "report"
    png = plot(curves, aurocs, report / "active_learning.png", found=found)
    doc = {"policy": policy, "labels_per_round": labels_per_round, "rounds": done, "test_auroc_by_round": aurocs,
           "defects_found": found, "policy_curves": curves}
    write_text(report / "active_learning.json", json.dumps(doc, indent=2) + "\n")
    return {**doc, "plot": png}

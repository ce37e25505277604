"""An active-learning round: labels -> tune -> compare with the current model -> promote if better -> new queue.

    outcome = run_round(ws, spec)      # what `aae-ray round WS` does

Training data come from the labels through `aae_ray.dataset` (confirmed defects are mixed in at each trial's
anomaly ratio, confirmed normals stay in). The search starts from the current model's config, enqueued as the
first trial. The new model replaces the current one only if it scores a higher AUROC on the same judging set:
the labeled `val` split, or, while `val` holds no defects, the synthetic objective the round was tuned on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aae_ray import artifacts, scoring
from aae_ray.workflow import recalibrate, score_pool
from aae_ray.workspace import Workspace

Echo = Callable[[str], None]


@dataclass
class RoundOutcome:
    round_no: int
    new_auroc: float | None
    old_auroc: float | None
    judged_on: str  # "val" or "synthetic"
    promoted: bool
    reason: str
    queue: Path | None
    metrics: dict[str, Any]


def run_round(ws: Workspace, spec, *, address: str | None = None, policy: str = "highest",
              echo: Echo = print) -> RoundOutcome:
    from aae_ray.tuning.runner import next_round, run_tune

    current = ws.current()
    round_no = next_round(ws)
    start_from = []
    if current is not None:
        start_from = [artifacts.load(ws.current_model_dir()).config.model_dump()]
        echo(f"round {round_no}: the search starts from round {current['round']}'s config")
    outcome = run_tune(ws, spec, round_no=round_no, address=address, initial_points=start_from, echo=echo)
    if outcome.interrupted or outcome.best is None:
        raise RuntimeError(f"round {round_no}'s search finished no trial; nothing to compare or promote "
                           f"(see {outcome.experiment})")
    new_dir = ws.model_dir(round_no)
    if current is None or current["round"] == round_no:  # run_tune promoted it: nothing was current
        (new_auc,), judged = judge(ws, [new_dir], spec.searcher.seed)
        promoted, old_auc, reason = True, None, "no model was promoted before"
    else:
        (new_auc, old_auc), judged = judge(ws, [new_dir, ws.current_model_dir()], spec.searcher.seed)
        promoted = new_auc > old_auc
        verdict = "higher" if promoted else "not higher"
        reason = (f"AUROC on the {judged} judging set {new_auc:.4f} (round {round_no}) is {verdict} than "
                  f"{old_auc:.4f} (round {current['round']})")
        if promoted:
            ws.promote(round_no, f"aae-ray round: {reason}")
    # Labels that arrived since the promoted model was calibrated (this round's, or the kept model's since its
    # own round) re-set its threshold; a no-op when nothing new is known.
    recalibrated = recalibrate(ws, echo=echo)
    if recalibrated["after"]["threshold"] != recalibrated["before"]["threshold"]:
        echo(f"recalibrated round {recalibrated['round']}'s threshold: {recalibrated['before']['threshold']:.4g} -> "
             f"{recalibrated['after']['threshold']:.4g}; {recalibrated['after']['threshold_note']}")
    queue, _ = score_pool(ws, round_no=round_no, policy=policy)
    return RoundOutcome(round_no, new_auc, old_auc, judged, promoted, reason, queue, outcome.metrics)


def judge(ws: Workspace, model_dirs: list[Path], seed: int) -> tuple[list[float], str]:
    """AUROC of each model on the round's judging set: the same images for every model compared (decoded and,
    for the synthetic objective, corrupted once, then resized to each model's input size)."""
    from aae_ray.tuning.trial_data import build_trial_data

    detectors = [artifacts.load(d) for d in model_dirs]
    data = build_trial_data(ws, [d.config.input_size for d in detectors], seed=seed)
    aucs = [scoring.auroc(data.objective_y, d.score_samples(data.objective_X[d.config.input_size]))
            for d in detectors]
    return aucs, data.objective_source


@dataclass
class LabeledBatch:
    round_no: int  # the round whose queue was answered
    ids: list[str]
    defects: list[bool]  # the answer for each id, in queue order
    n_left: int  # unlabeled images still in that queue

    @property
    def n_defects(self) -> int:
        return sum(self.defects)


def latest_queue(ws: Workspace) -> tuple[int, Path] | None:
    for n in reversed(ws.rounds()):
        path = ws.round_dir(n) / "scores.parquet"
        if path.exists():
            return n, path
    return None


def answer_queue(ws: Workspace, k: int, labeler: str = "oracle") -> LabeledBatch:
    """The simulated labeler: answer the first k unlabeled images of the latest queue from the import's truth."""
    import pyarrow.parquet as pq

    from aae_ray.labels import LabelEvent, append, current_labels

    found = latest_queue(ws)
    if found is None:
        raise ValueError(f"no labeling queue in {ws.root}: run `aae-ray score` or `aae-ray round` first")
    round_no, path = found
    queue = pq.read_table(path).to_pylist()
    images = ws.images()
    truth = dict(zip(images.column("id").to_pylist(), images.column("truth").to_pylist(), strict=True))
    done = current_labels(ws.labels_dir)
    todo = [r for r in queue if r["id"] not in done]
    picked = todo[:k]
    unknown = [r["id"] for r in picked if truth.get(r["id"]) is None]
    if unknown:
        raise ValueError(f"the simulated labeler needs the import's truth, and {len(unknown)} queued images have "
                         f"none (e.g. {unknown[0]}): simulate works on synthetic and fashion-mnist workspaces")
    model = (ws.current() or {}).get("model")
    events = [LabelEvent(r["id"], "defect" if truth[r["id"]] == 1 else "normal", labeler, round_no, r["t2"], model)
              for r in picked]
    append(ws.labels_dir, events)
    return LabeledBatch(round_no, [e.id for e in events], [e.label == "defect" for e in events],
                        len(todo) - len(picked))

"""An active-learning round: labels -> tune (+ warm start) -> paired comparison -> promote on a clear gain -> queue.

    outcome = run_round(ws, spec)      # what `aae-ray round WS` does

Training data come from the labels through `aae_ray.dataset` (confirmed defects are mixed in at each trial's
anomaly ratio, confirmed normals stay in). The search starts from the current model's config, enqueued as the
first trial. Beside the search, the promoted model is fine-tuned on the new labels for a few epochs (the warm
start); the better of the two on the judging set (the labeled `val` split, or, while `val` holds no defects, the
synthetic objective the round was tuned on) replaces the current model only on a clear paired gain: the
bootstrap interval of its AUROC difference to the current model's, on the same images, lies above zero.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aae_ray import artifacts, scoring
from aae_ray.importing import LINE_SOURCE
from aae_ray.pool_scoring import score_pool
from aae_ray.train import recalibrate, train_round
from aae_ray.workspace import Workspace, write_text

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
    candidate: str = "search"  # which candidate became the round's model: "search" or "warm"
    seconds: dict[str, float] = field(default_factory=dict)  # search, warm start, judging, total


def run_round(ws: Workspace, spec, *, address: str | None = None, policy: str = "highest",
              echo: Echo = print) -> RoundOutcome:
    """Search (started from the current config) and, where a model is promoted, a warm-started candidate (it,
    fine-tuned on today's labels); the better of the two on the judging set becomes the round's model, and
    replaces the current one only on a clear paired gain. Then the promoted model is recalibrated and the pool
    scored into the round's queue. The decision and every step's wall time go to `rounds/rNNN/round.json`."""
    from aae_ray.tuning.runner import next_round

    t0 = time.perf_counter()
    current = ws.current()
    round_no = next_round(ws)
    search = spec.round.search or current is None
    metrics = _search(ws, spec, round_no, current, address, echo) if search else {}
    seconds = {"search": time.perf_counter() - t0}
    first = current is None or current["round"] == round_no  # run_tune promoted it: nothing was current
    warm_dir = None if first else _warm_candidate(ws, round_no, spec, echo)
    if not search:  # the warm-started candidate is the round's only one
        if warm_dir is None:
            raise RuntimeError(f"round {round_no}: the warm-started candidate is over the latency budget and "
                               f"round.search is false: there is no candidate (search, or raise the budget)")
        os.replace(warm_dir, ws.model_dir(round_no))
        warm_dir, metrics = None, artifacts.read_metrics(ws.model_dir(round_no))
    seconds["warm_start"] = time.perf_counter() - t0 - seconds["search"]
    t_judge = time.perf_counter()
    if first:
        judging = judge(ws, [ws.model_dir(round_no)], spec.searcher.seed)
        v = _Verdict(judging.aurocs[0], None, True, "no model was promoted before", "search", judging.source)
    else:
        v = _judge_against_current(ws, spec, round_no, current["round"], warm_dir, "search" if search else "warm")
        if v.candidate == "warm" and search:
            metrics = artifacts.read_metrics(ws.model_dir(round_no))
        if v.promoted:
            ws.promote(round_no, f"aae-ray round: {v.reason}")
    seconds["judge"] = time.perf_counter() - t_judge
    echo(f"round {round_no}: {v.reason}")
    queue = _after_the_decision(ws, round_no, policy, echo)
    seconds["total"] = time.perf_counter() - t0
    write_text(ws.round_dir(round_no) / "round.json", json.dumps(
        {"round": round_no, "candidate": v.candidate, "promoted": v.promoted, "reason": v.reason,
         "new_auroc": v.new_auroc, "old_auroc": v.old_auroc, "judged_on": v.judged_on, "seconds": seconds},
        indent=2) + "\n")
    echo(f"round {round_no} took {seconds['total']:.0f} s (search {seconds['search']:.0f} s, warm start "
         f"{seconds['warm_start']:.0f} s)")
    return RoundOutcome(round_no, v.new_auroc, v.old_auroc, v.judged_on, v.promoted, v.reason, queue, metrics,
                        v.candidate, seconds)


@dataclass(frozen=True)
class _Verdict:
    new_auroc: float | None
    old_auroc: float | None
    promoted: bool
    reason: str
    candidate: str  # "search" or "warm": which became the round's model
    judged_on: str


def _search(ws: Workspace, spec, round_no: int, current: dict | None, address: str | None, echo: Echo) -> dict:
    """The round's search, its first trial the current model's config; the exported model's metrics."""
    from aae_ray.tuning.runner import run_tune

    start_from = []
    if current is not None:
        start_from = [artifacts.load(ws.current_model_dir()).config.model_dump()]
        echo(f"round {round_no}: the search starts from round {current['round']}'s config")
    outcome = run_tune(ws, spec, round_no=round_no, address=address, initial_points=start_from, echo=echo)
    if outcome.interrupted or outcome.best is None:
        raise RuntimeError(f"round {round_no}'s search finished no trial; nothing to compare or promote "
                           f"(see {outcome.experiment})")
    return outcome.metrics


def _judge_against_current(ws: Workspace, spec, round_no: int, current_round: int, warm_dir: Path | None,
                           candidate: str) -> _Verdict:
    """The round's candidates (its model, and the warm start beside a search) against the current model on the
    judging set. A warm start that wins becomes the round's model (the search's model is kept beside it)."""
    new_dir = ws.model_dir(round_no)
    judging = judge(ws, [new_dir, *([warm_dir] if warm_dir else []), ws.current_model_dir()], spec.searcher.seed)
    *cands, old_scores = judging.scores
    best = int(np.argmax([scoring.auroc(judging.y, c) for c in cands]))
    if warm_dir is not None and best == 1:
        candidate = "warm"
        shutil.rmtree(ws.round_dir(round_no) / SEARCH_MODEL, ignore_errors=True)
        os.replace(new_dir, ws.round_dir(round_no) / SEARCH_MODEL)
        os.replace(warm_dir, new_dir)
    promoted, reason, cmp = decide(judging.y, cands[best], old_scores, spec.round.confidence, spec.searcher.seed)
    reason = (f"on the {judging.source} judging set, round {round_no}'s {candidate} candidate vs round "
              f"{current_round}: {reason}")
    return _Verdict(cmp.new_auroc, cmp.old_auroc, promoted, reason, candidate, judging.source)


def _after_the_decision(ws: Workspace, round_no: int, policy: str, echo: Echo) -> Path:
    """Labels that arrived since the promoted model was calibrated (this round's, or the kept model's since its
    own round) re-set its threshold (a no-op when nothing new is known); then the pool is scored into the round's
    queue."""
    recalibrated = recalibrate(ws, echo=echo)
    if recalibrated["after"]["threshold"] != recalibrated["before"]["threshold"]:
        echo(f"recalibrated round {recalibrated['round']}'s threshold: {recalibrated['before']['threshold']:.4g} -> "
             f"{recalibrated['after']['threshold']:.4g}; {recalibrated['after']['threshold_note']}")
    queue, _ = score_pool(ws, round_no=round_no, policy=policy)
    return queue


def decide(y: np.ndarray, new: np.ndarray, old: np.ndarray, confidence: float = 0.95,
           seed: int = 0) -> tuple[bool, str, scoring.PairedComparison]:
    """The promotion rule: (promote?, why, the comparison). Promote only when the whole bootstrap interval of
    the paired AUROC difference lies above zero; a gain inside the noise of the judging set keeps the model."""
    cmp = scoring.compare_paired(y, new, old, confidence=confidence, seed=seed)
    verdict = "a clear gain: promoted" if cmp.clear_gain else "no clear gain: the current model stays"
    return cmp.clear_gain, f"{cmp.describe()}, {verdict}", cmp


SEARCH_MODEL = "search_model"  # where the search's best stays when the warm-started candidate wins
WARM_MODEL = "warm_model"


def _warm_candidate(ws: Workspace, round_no: int, spec, echo: Echo) -> Path | None:
    """The promoted model fine-tuned for round.warm_start_epochs on today's training data (its labels included),
    saved beside the round's model; None when warm starts are off, or when a latency budget is set and the
    candidate, timed here as the search's trials were, is over it."""
    epochs = spec.round.warm_start_epochs
    if epochs == 0:
        return None
    current = artifacts.load(ws.current_model_dir())
    cfg = current.config.model_copy(update={"epochs": epochs})
    folder = ws.round_dir(round_no) / WARM_MODEL
    echo(f"round {round_no}: warm start: round {ws.current()['round']}'s model fine-tuned for {epochs} epochs")
    train_round(ws, cfg, round_no=round_no, echo=lambda _: None, init=current, folder=folder)
    budget = spec.select.max_ms_per_image
    if budget is not None:
        timing = _time_candidate(ws, folder, spec.latency)
        if timing.ms_per_image > budget:
            echo(f"round {round_no}: warm start left out: {timing.describe()}, over the {budget:g} ms budget")
            shutil.rmtree(folder)
            return None
    return folder


def _time_candidate(ws: Workspace, folder: Path, latency):
    """A candidate's scoring time as a latency search times its trials (aae_ray.latency), on the pool's images."""
    from aae_ray.dataset import pool_arrays

    return latency.time(folder, pool_arrays(ws, artifacts.read_config(folder).input_size).X)


@dataclass(frozen=True)
class Judging:
    y: np.ndarray  # 1 = defect
    scores: list[np.ndarray]  # each model's primary score on the same images
    source: str  # "val" or "synthetic"

    @property
    def aurocs(self) -> list[float]:
        return [scoring.auroc(self.y, s) for s in self.scores]


def judge(ws: Workspace, model_dirs: list[Path], seed: int) -> Judging:
    """Each model's scores on the round's judging set: the same images for every model compared (decoded and,
    for the synthetic objective, corrupted once, then resized to each model's input size)."""
    from aae_ray.tuning.trial_data import build_trial_data

    detectors = [artifacts.load(d) for d in model_dirs]
    data = build_trial_data(ws, [d.config.input_size for d in detectors], seed=seed)
    scores = [d.score_samples(data.objective_X[d.config.input_size]) for d in detectors]
    return Judging(data.objective_y, scores, data.objective_source)


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


# --- images from the line in the queue ---------------------------------------------------------------------------


def line_station(source: str | None) -> str | None:
    """The station a line image came from (its source is `line:<station>`, `aae_ray.importing.line`); None for
    an image imported any other way."""
    return source[len(LINE_SOURCE):] if source and source.startswith(LINE_SOURCE) else None


def line_stations(ws: Workspace) -> dict[str, str]:
    """{id: station} of the workspace's images that came from the line."""
    import pyarrow.parquet as pq

    t = pq.read_table(ws.images_path, columns=["id", "source"])
    pairs = zip(t.column("id").to_pylist(), t.column("source").to_pylist(), strict=True)
    return {i: station for i, source in pairs if (station := line_station(source)) is not None}


def for_labeling(rows: Sequence[dict], stations: Mapping[str, str], *, line_first: bool = True,
                 station: str | None = None) -> list[dict]:
    """A queue's to-do rows (in rank order) as the labeling page lists them. `stations`: {id: station} of the
    line images (`line_stations`); `station`: only that station's line images; `line_first`: the line images
    before the others, a stable sort, so each group keeps its rank order."""
    picked = [r for r in rows if station is None or stations.get(r["id"]) == station]
    return sorted(picked, key=lambda r: r["id"] not in stations) if line_first else picked


@dataclass(frozen=True)
class Enqueued:
    round_no: int  # the queue's round
    path: Path
    added: list[str]  # ids the queue did not hold: queued with the prediction log's scores
    moved: list[str]  # ids it held, moved to the top
    rewritten: bool  # False when they were at the top already (nothing written)


QUEUE_SCORES = ("score", "t2", "t2_local", "p_value", "anomaly")  # what the prediction log gives a new queue row


def enqueue(ws: Workspace, ids: Sequence[str]) -> Enqueued:
    """Put these pool images at the top of the latest queue now: ranks 1..k in the order given, the others
    shifted down in their order, the file rewritten atomically. What a "send to labeling" button does after
    `aae_ray.importing.line(ws.root, ids=...)`. An id the queue holds moves up with its scores; one it does not
    hold is queued with the scores of its latest answer in the prediction log. Idempotent: the same ids again
    leave the queue as it is. ValueError: no queue yet, an id not in the pool, or a new id the log lacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aae_ray.data.images import write_table_with
    from aae_ray.pool_scoring import SCORES_SCHEMA

    found = latest_queue(ws)
    if found is None:
        raise ValueError(f"no labeling queue in {ws.root} yet: run `aae-ray score {ws.root}` first")
    round_no, path = found
    ids = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
    _check_pool(ws, ids)
    rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["rank"])
    held = {r["id"]: r for r in rows}
    added = [i for i in ids if i not in held]
    held.update(_logged_scores(ws, added))
    first = set(ids)
    order = [held[i] for i in ids] + [r for r in rows if r["id"] not in first]
    new = [{**r, "rank": k} for k, r in enumerate(order, start=1)]
    rewritten = [(r["id"], r["rank"]) for r in new] != [(r["id"], r["rank"]) for r in rows]
    if rewritten:
        write_table_with(pa.Table.from_pylist(new, schema=SCORES_SCHEMA), path, SCORES_SCHEMA)
    return Enqueued(round_no, path, added, [i for i in ids if i not in added], rewritten)


def _check_pool(ws: Workspace, ids: list[str]) -> None:
    pool = ws.pool_ids()
    outside = [i for i in ids if i not in pool]
    if outside:
        raise ValueError(f"{len(outside)} of the ids are not pool images of {ws.root} (e.g. {outside[0]}): a line "
                         f"image joins the pool first, with aae_ray.importing.line(ws.root, ids=[...])")


def _logged_scores(ws: Workspace, ids: list[str]) -> dict[str, dict]:
    """{id: a queue row but its rank} from each id's latest answer in the prediction log."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from aae_ray.prediction_log import read_predictions

    if not ids:
        return {}
    t = read_predictions(ws.predictions_dir, columns=["ts", "id", *QUEUE_SCORES])
    latest = {r["id"]: r for r in t.filter(pc.is_in(t.column("id"), pa.array(ids, pa.string()))).to_pylist()}
    missing = [i for i in ids if i not in latest]
    if missing:
        raise ValueError(f"{len(missing)} of the ids are neither in the queue nor in the prediction log of "
                         f"{ws.root} (e.g. {missing[0]}): no scores to queue them with")
    nan = float("nan")  # score_pool's t2_local where a family has no local map
    return {i: {"id": i, **{k: latest[i][k] for k in QUEUE_SCORES},
                "t2_local": nan if latest[i]["t2_local"] is None else latest[i]["t2_local"]} for i in ids}


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

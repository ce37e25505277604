"""Run a round's search: Ray Tune runs the trials, Optuna (TPE) picks their configs, ASHA stops weak ones.
With `latency:` in the spec, Optuna searches AUROC and the scoring time per image together (no ASHA), and the
round's model is the best AUROC within `select.max_ms_per_image` (aae_ray.tuning.selection).

    outcome = run_tune(ws, spec, round_no=0)       # WS/rounds/r000/tune/ holds the (resumable) experiment

The story: decode the workspace once -> put it in the object store -> Tuner(OptunaSearch, ASHA) -> fit ->
copy the best trial's model into WS/rounds/rNNN/model/ with its val/test metrics -> promote it if nothing is
promoted yet -> write the report. `--resume` restores the same experiment; finished trials are not re-run
and the Optuna study (sqlite, in the experiment folder) gets no duplicates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Saving the experiment state after every trial event (default: at most every 10 s) is what makes a
# resume after `kill -9` skip finished trials and keep the persisted study free of duplicates.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # ...which it warns about
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 Tune then prints nothing: ProgressLines does
# A Ray error line printed by the driver would swap builtins.print for tqdm_ray's, and a Tuner holding echo=print
# could no longer be pickled ("Can't pickle <built-in function print>").
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from aae_ray import artifacts  # noqa: E402
from aae_ray.cluster import connect  # noqa: E402
from aae_ray.formatting import metric  # noqa: E402
from aae_ray.train import evaluate, fingerprint_ids, threshold_metrics  # noqa: E402
from aae_ray.tuning.atomic_fs import atomic_local_filesystem  # noqa: E402
from aae_ray.tuning.round_report import write_report  # noqa: E402
from aae_ray.tuning.selection import choose, front, why_none  # noqa: E402
from aae_ray.tuning.spec import LATENCY_METRIC, TuneSpec, parse_spec, with_budget  # noqa: E402
from aae_ray.tuning.trainable import train_trial  # noqa: E402
from aae_ray.tuning.trial_data import TrialData, build_trial_data  # noqa: E402
from aae_ray.workspace import Workspace, write_text  # noqa: E402

Echo = Callable[[str], None]
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("ray.tune").setLevel(logging.WARNING)  # its INFO lines repeat what ProgressLines says
EXPERIMENT = "tune"  # WS/rounds/rNNN/tune/
STUDY_FILE = "optuna.sqlite3"
STORAGE = atomic_local_filesystem()  # a kill -9 while Tune saves its state must not leave empty files
SPEC_FILE = "tune_spec.json"  # WS/rounds/rNNN/tune_spec.json: what --resume continues with


class TuneError(RuntimeError):
    """A tuning run that cannot start or produced no usable model; the message says what to do."""


@dataclass
class TrialRow:
    trial_id: str
    status: str  # complete | stopped (by ASHA) | error | unfinished
    metric: float | None
    epochs: int
    params: dict[str, Any]
    error: str | None = None
    checkpoint: Path | None = None
    ms_per_image: float | None = None  # a latency search's second objective (aae_ray.latency)
    latency_engine: str | None = None  # what scored when it was timed: torch or onnxruntime


@dataclass
class TuneOutcome:
    round_no: int
    experiment: Path
    rows: list[TrialRow]
    best: TrialRow | None
    metrics: dict[str, Any] = field(default_factory=dict)  # the exported model's metrics.json
    interrupted: bool = False
    objective_source: str = "val"
    report: Path | None = None
    spec: TuneSpec | None = None
    no_choice: str | None = None  # why no trial became the round's model, where none did


def study_name(round_no: int) -> str:
    return f"aae-ray-r{round_no:03d}"


def experiment_dir(ws: Workspace, round_no: int) -> Path:
    # Absolute: Ray Tune reads a relative storage path as a URI and fails ("URI has empty scheme").
    return (ws.round_dir(round_no) / EXPERIMENT).absolute()


def restorable(exp: Path) -> bool:
    return exp.exists() and tune.Tuner.can_restore(str(exp), storage_filesystem=STORAGE)


def next_round(ws: Workspace) -> int:
    """The round a new run tunes: after the last one, or the last one again if it never got a model or a
    resumable experiment (a run that failed before Tune started)."""
    rounds = ws.rounds()
    if not rounds:
        return 0
    last = rounds[-1]
    unused = not ws.model_dir(last).exists() and not restorable(experiment_dir(ws, last))
    return last if unused else last + 1


def resumed_round(ws: Workspace) -> int:
    """The round `--resume` continues: the last one with a tune experiment."""
    tuned = [n for n in ws.rounds() if experiment_dir(ws, n).exists()]
    if not tuned:
        raise ValueError(f"nothing to resume: no round in {ws.root} has a tune experiment")
    return tuned[-1]


def run_tune(ws: Workspace, spec: TuneSpec | None, *, round_no: int, address: str | None = None, resume: bool = False,
             initial_points: list[dict[str, Any]] | None = None, max_ms_per_image: float | None = None,
             echo: Echo = print) -> TuneOutcome:
    """`max_ms_per_image` with `resume`: choose again from the finished trials under this budget (a new run
    takes its budget from the spec)."""
    exp = experiment_dir(ws, round_no)
    if resume and not restorable(exp):
        raise TuneError(f"nothing to resume: no tune experiment in {exp}")
    if not resume and exp.exists() and restorable(exp):
        raise TuneError(f"round {round_no} already has a tune experiment in {exp}; "
                        f"pass --resume to continue it, or remove that folder to start over")
    if resume:  # the trials in the experiment were sampled from the spec the round started with
        saved = json.loads((exp.parent / SPEC_FILE).read_text())
        spec = parse_spec(with_budget(saved, max_ms_per_image), where=str(exp.parent / SPEC_FILE))
    elif spec is None:
        raise TuneError("a new tuning run needs a spec")
    start = time.perf_counter()
    data = build_trial_data(ws, spec.values("input_size"), seed=spec.searcher.seed)
    n_def = int(data.y.sum())
    echo(f"tuning round {round_no}: {len(data.y) - n_def} presumed-normal and {n_def} confirmed-defect training "
         f"images; {data.describe()}")
    connect(address)
    echo(f"ray: {_cluster_line()}")
    if not resume:  # only now, so a run that could not start leaves nothing behind
        if exp.exists():  # a run that died before Tune saved any state: its study must not leak into this one
            shutil.rmtree(exp)
        exp.mkdir(parents=True)
        write_text(exp.parent / SPEC_FILE, json.dumps(spec.model_dump(by_alias=True, exclude_none=True), indent=2))
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, latency=spec.latency),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if resume:
        echo(f"resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=STORAGE)
    else:
        tuner = _new_tuner(spec, trainable, exp, round_no, initial_points or [], echo)
    grid = tuner.fit()
    rows = _rows(grid, spec)
    interrupted = any(r.status == "unfinished" for r in rows) or len(rows) < spec.num_samples
    best = choose(rows, spec)
    outcome = TuneOutcome(round_no, exp, rows, best, interrupted=interrupted, objective_source=data.objective_source,
                          spec=spec, no_choice=None if best else why_none(rows, spec))
    if outcome.best is not None and not interrupted:
        before = _exported_trial(ws, round_no)
        outcome.metrics = export_best(ws, outcome, data, spec)
        current = ws.current()
        if current is None:
            ws.promote(round_no, f"aae-ray tune: best of {len(rows)} trials, nothing promoted before")
        elif current["round"] == round_no and before not in (None, best.trial_id):
            # --resume under a new budget chose another trial for the served round: a new pointer is what makes
            # a running endpoint load it
            ws.promote(round_no, f"aae-ray tune --resume: trial {best.trial_id} chosen from the round's "
                       f"{len(rows)} trials (was {before})" + _budget_words(spec))
        sweep = (sweep_anomaly_ratio(ws, spec, outcome, trainable, int(data.y.sum()), echo)
                 if spec.report.anomaly_ratio_sweep else {})
        outcome.report = write_report(ws, round_no, spec, rows, f"sqlite:///{exp / STUDY_FILE}",
                                      study_name(round_no), sweep, best)
    write_text(exp.parent / "tune_summary.json", _summary_json(outcome, spec, time.perf_counter() - start))
    return outcome


def _new_tuner(spec: TuneSpec, trainable, exp: Path, round_no: int, initial_points: list[dict[str, Any]],
               echo: Echo) -> tune.Tuner:
    storage = optuna.storages.RDBStorage(f"sqlite:///{exp / STUDY_FILE}")
    s = spec.searcher
    sampler = (optuna.samplers.RandomSampler(seed=s.seed) if s.algorithm == "random"
               else optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials))
    # Ray's OptunaSearch wants every searched key in a start point, each a value the space can take.
    points = [{k: p[k] for k in spec.space} for p in initial_points
              if all(k in p and dim.contains(p[k]) for k, dim in spec.space.items())]
    if len(points) < len(initial_points):
        echo(f"{len(initial_points) - len(points)} start point(s) left out: outside this spec's space")
    # Several objectives go to the searcher as lists; Tune itself then has no single metric (and no ASHA: the
    # spec refuses it), so the trial rows are ranked and chosen here (aae_ray.tuning.selection).
    multi = spec.latency is not None
    searcher = OptunaSearch(sampler=sampler, study_name=study_name(round_no), storage=storage,
                            points_to_evaluate=points or None, metric=spec.objectives if multi else None,
                            mode=spec.modes if multi else None)
    if spec.scheduler.asha:
        max_t = spec.max_epochs
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(spec.scheduler.grace_period, max_t),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if multi:
        lat = spec.latency
        budget = spec.select.max_ms_per_image
        echo(f"objectives: {spec.metric} ({spec.mode}) and {LATENCY_METRIC} (min; {lat.engine} engine, batch "
             f"{lat.batch_size}, on each trial's own CPUs/GPU); the model: the best {spec.metric}"
             + (f" within {budget:g} ms/image" if budget else ", however slow (no select.max_ms_per_image)"))
    echo(f"search: {s.algorithm} over {', '.join(spec.space) or 'nothing'}; {spec.num_samples} trials, "
         f"{spec.max_concurrent} at once, {spec.resources.cpu:g} CPU + {spec.resources.gpu:g} GPU each; "
         f"study: optuna-dashboard sqlite:///{exp / STUDY_FILE}")
    return tune.Tuner(
        trainable,
        param_space={**spec.base_config(), **spec.param_space()},
        tune_config=tune.TuneConfig(metric=None if multi else spec.metric, mode=None if multi else spec.mode,
                                    search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(exp.parent), storage_filesystem=STORAGE, verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[ProgressLines(spec, echo)],
        ),
    )


class ProgressLines(tune.Callback):
    """The live progress: one line per reported epoch and per finished trial, with the best so far."""

    def __init__(self, spec: TuneSpec, echo: Echo):
        self.spec, self.echo, self.best, self.done = spec, echo, None, 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.spec.metric)
        if value is not None and (self.best is None or _better(value, self.best, self.spec.mode)):
            self.best = value
        running = sum(t.status == "RUNNING" for t in trials)
        ms = result.get(LATENCY_METRIC)
        timed = f"  {ms:.3g} ms/image" if ms is not None else ""
        self.echo(f"  {trial.trial_id:>14}  epoch {result.get('epoch', '?')}/{trial.config.get('epochs', '?')}  "
                  f"{self.spec.metric} {metric(value, 4)}{timed}  best {metric(self.best, 4)}  "
                  f"[{self.done}/{self.spec.num_samples} done, {running} running]  {_short(trial.config, self.spec)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.echo(f"  {trial.trial_id:>14}  FAILED: {_error_line(trial.error_file)}")


def _exported_trial(ws: Workspace, round_no: int) -> str | None:
    """The trial whose model the round holds, if it holds one."""
    folder = ws.model_dir(round_no)
    return artifacts.read_metrics(folder).get("trial") if (folder / "metrics.json").exists() else None


def _budget_words(spec: TuneSpec) -> str:
    budget = spec.select.max_ms_per_image
    return f", the best {spec.metric} within {budget:g} ms/image" if budget is not None else ""


def export_best(ws: Workspace, outcome: TuneOutcome, data: TrialData, spec: TuneSpec) -> dict[str, Any]:
    """The best trial's artifact becomes WS/rounds/rNNN/model/, with metrics from the workspace's val/test."""
    best = outcome.best
    assert best is not None and best.checkpoint is not None
    det = artifacts.load(best.checkpoint)
    trial_metrics = artifacts.read_metrics(best.checkpoint)
    metrics = {"round": outcome.round_no, "trial": best.trial_id, "data_fingerprint": fingerprint_ids(
        data.fingerprint_ids, data.y), **evaluate(ws, det), "objective": best.metric, "objective_metric": spec.metric,
        "objective_source": outcome.objective_source, **threshold_metrics(det),
        "n_train": trial_metrics.get("n_train"), "n_defects_mixed": trial_metrics.get("n_defects_mixed"),
        "train_images_per_s": trial_metrics.get("images_per_s"), "config": det.config.model_dump()}
    if spec.latency is not None:  # as the trial measured it, on the trial's hardware
        metrics.update({LATENCY_METRIC: best.ms_per_image, "latency_engine": best.latency_engine,
                        "latency_batch_size": spec.latency.batch_size,
                        "max_ms_per_image": spec.select.max_ms_per_image})
    target = ws.model_dir(outcome.round_no)
    if target.exists():
        shutil.rmtree(target)
    artifacts.save(det, target, metrics, trained_on=artifacts.read_trained_on(best.checkpoint))
    return metrics


def sweep_anomaly_ratio(ws: Workspace, spec: TuneSpec, outcome: TuneOutcome, trainable, n_confirmed: int,
                        echo: Echo) -> dict[float | str, Path]:
    """Retrain the best config at every anomaly_ratio the space offers; {ratio: artifact folder}.

    Skipped (empty) when anomaly_ratio is not a searched choice, or when there are no confirmed defects to mix
    in (every ratio would train the same model)."""
    dim = spec.space.get("anomaly_ratio")
    best = outcome.best
    if dim is None or dim.choice is None or best is None:
        return {}
    if n_confirmed == 0:
        echo("anomaly-ratio sweep skipped: no confirmed defects to mix in, every ratio trains the same model")
        return {}
    base = {**spec.base_config(), **best.params}
    chosen = best.params["anomaly_ratio"]
    ratios_left = [r for r in dict.fromkeys(dim.choice) if r != chosen]  # a share, or "all"
    if not ratios_left:
        return {}
    echo(f"anomaly-ratio sweep: best config at anomaly_ratio {', '.join(str(r) for r in ratios_left)}")
    folder = (ws.round_dir(outcome.round_no) / "sweep").absolute()
    if folder.exists():
        shutil.rmtree(folder)
    grid = tune.Tuner(
        trainable,
        param_space={**base, "anomaly_ratio": tune.grid_search(ratios_left)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name="sweep", storage_path=str(folder.parent), storage_filesystem=STORAGE,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    ).fit()
    out = {chosen: best.checkpoint}
    for result in grid:
        if result.error is None and result.checkpoint is not None:
            out[result.config["anomaly_ratio"]] = Path(result.checkpoint.path)
    return out  # type: ignore[return-value]


def _rows(grid, spec: TuneSpec) -> list[TrialRow]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        epochs = int(m.get("epoch") or 0)
        ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else None
        if result.error is not None:
            status = "error"
        elif ckpt is not None:
            status = "complete"
        elif m.get("done") and epochs > 0:
            status = "stopped"
        else:
            status = "unfinished"
        params = {k: result.config.get(k) for k in spec.space}
        value, ms = m.get(spec.metric), m.get(LATENCY_METRIC)
        rows.append(TrialRow(trial_id, status, value if _finite(value) else None, epochs, params,
                             _error_text(result.error), ckpt, ms if _finite(ms) else None, m.get("latency_engine")))
    return rows


def ranked(rows: list[TrialRow], spec: TuneSpec) -> list[TrialRow]:
    """Trials best first; finished ones before ASHA-stopped ones at the same value, failed ones last."""
    sign = 1 if spec.mode == "max" else -1
    return sorted(rows, key=lambda r: (r.metric is None, -(sign * r.metric) if r.metric is not None else 0,
                                       r.status != "complete"))


def _summary_json(outcome: TuneOutcome, spec: TuneSpec, seconds: float) -> str:
    counts: dict[str, int] = {}
    for r in outcome.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    best = outcome.best
    return json.dumps({
        "round": outcome.round_no, "experiment": str(outcome.experiment), "metric": spec.metric, "mode": spec.mode,
        "objective_source": outcome.objective_source, "interrupted": outcome.interrupted, "seconds": round(seconds, 1),
        "trials": counts, "best": None if best is None else {"trial": best.trial_id, spec.metric: best.metric,
                                                             LATENCY_METRIC: best.ms_per_image, "params": best.params},
        "no_choice": outcome.no_choice, "max_ms_per_image": spec.select.max_ms_per_image,
        "val_auroc": outcome.metrics.get("val_auroc"), "test_auroc": outcome.metrics.get("test_auroc"),
        "pareto": [_row_json(r, spec) for r in front(outcome.rows, spec)],
        "top": [_row_json(r, spec) for r in ranked(outcome.rows, spec)],
    }, indent=2, default=str)


def _row_json(r: TrialRow, spec: TuneSpec) -> dict[str, Any]:
    timed = {LATENCY_METRIC: r.ms_per_image, "latency_engine": r.latency_engine} if spec.latency else {}
    return {"trial": r.trial_id, "status": r.status, spec.metric: r.metric, **timed, "epochs": r.epochs,
            "params": r.params, "error": r.error}


def _cluster_line() -> str:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _short(config: dict[str, Any], spec: TuneSpec) -> str:
    return " ".join(f"{k}={metric(v, 4) if isinstance(v, float) else v}" for k, v in config.items() if k in spec.space)


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the innermost exception's line names the cause
        if "Error" in ln or "Diverged" in ln:
            return ln.strip()[:300]
    return lines[-1][:300] if lines else type(error).__name__


def _error_line(error_file: str | None) -> str:
    if not error_file or not Path(error_file).exists():
        return "see the trial's error.txt"
    return _error_text(RuntimeError(Path(error_file).read_text())) or "unknown error"

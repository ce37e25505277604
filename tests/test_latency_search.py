"""AUROC x latency: a model's scoring time (aae_ray.latency), the spec's `latency` and `select`, the Pareto front
and the choice under a budget (aae_ray.tuning.selection), and a real multi-objective Ray Tune + Optuna search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import run_cli, tiny_config

from aae_ray import artifacts
from aae_ray.dataset import pool_arrays
from aae_ray.detector import Detector
from aae_ray.export import ExportError
from aae_ray.latency import time_scoring
from aae_ray.tuning.runner import TrialRow
from aae_ray.tuning.selection import choose, front, why_none
from aae_ray.tuning.spec import SpecError, load_spec, parse_spec
from aae_ray.workspace import Workspace

TIMED = {"latency": {"images": 8, "repeats": 2}}


# --- the spec ------------------------------------------------------------------------------------------------


def test_a_latency_spec_searches_the_metric_up_and_the_time_down_without_asha():
    spec = parse_spec(TIMED)
    assert spec.objectives == ["val_auroc", "ms_per_image"] and spec.modes == ["max", "min"]
    assert not spec.scheduler.asha  # left out: a latency search gets no scheduler
    assert (spec.latency.engine, spec.latency.batch_size) == ("auto", 1)
    plain = parse_spec({})
    assert plain.objectives == ["val_auroc"] and plain.modes == ["max"] and plain.scheduler.asha


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**TIMED, "scheduler": {"asha": True}}, "a latency search cannot use ASHA"),
        ({"select": {"max_ms_per_image": 2.0}}, "select.max_ms_per_image needs latency"),
        ({**TIMED, "select": {"max_ms_per_image": 0}}, "select.max_ms_per_image: Input should be greater than 0"),
        ({"latency": {"engine": "tensorrt"}}, "latency.engine: Input should be 'auto', 'torch' or 'onnx'"),
        ({"latency": {"batch_size": 0}}, "latency.batch_size: Input should be greater than or equal to 1"),
        ({"select": {"max_ms": 2.0}}, "select.max_ms: Extra inputs are not permitted"),
    ],
)
def test_a_bad_latency_spec_is_one_line_naming_what_is_wrong(values, message):
    with pytest.raises(SpecError) as err:
        parse_spec(values, where="my.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_budget_on_the_command_line_replaces_the_specs(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("latency: {batch_size: 4}\nselect: {max_ms_per_image: 9}\n")
    assert load_spec(path).select.max_ms_per_image == 9
    assert load_spec(path, max_ms_per_image=2.5).select.max_ms_per_image == 2.5
    assert load_spec(path, max_ms_per_image=2.5).latency.batch_size == 4


def test_a_budget_for_a_search_that_times_nothing_is_refused_on_the_command_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("num_samples: 2\n")
    with pytest.raises(SpecError, match="needs latency"):
        load_spec(path, max_ms_per_image=2.5)


# --- the front and the choice --------------------------------------------------------------------------------


def _row(name: str, auroc: float | None, ms: float | None, status: str = "complete") -> TrialRow:
    return TrialRow(name, status, auroc, 2, {}, checkpoint=Path(name), ms_per_image=ms, latency_engine="torch")


ROWS = [_row("slow-best", 0.99, 40.0), _row("mid", 0.97, 8.0), _row("fast", 0.90, 1.0),
        _row("dominated", 0.95, 20.0), _row("tie-slower", 0.97, 9.0), _row("failed", None, None, "error"),
        _row("stopped", 0.999, 0.1, "stopped")]


def test_the_front_holds_the_trials_nothing_beats_on_both_fastest_first():
    spec = parse_spec(TIMED)
    assert [r.trial_id for r in front(ROWS, spec)] == ["fast", "mid", "slow-best"]
    assert front(ROWS, parse_spec({})) == []  # no latency search, no front


def test_the_choice_is_the_best_metric_within_the_budget():
    assert choose(ROWS, parse_spec(TIMED)).trial_id == "slow-best"  # no budget: the best, however slow
    assert choose(ROWS, parse_spec({**TIMED, "select": {"max_ms_per_image": 10}})).trial_id == "mid"  # not its tie
    assert choose(ROWS, parse_spec({**TIMED, "select": {"max_ms_per_image": 1.0}})).trial_id == "fast"
    assert choose(ROWS, parse_spec({})).trial_id == "slow-best"  # an ASHA-stopped trial has no model


def test_no_trial_within_the_budget_says_which_is_fastest_and_what_to_do():
    spec = parse_spec({**TIMED, "select": {"max_ms_per_image": 0.5}})
    assert choose(ROWS, spec) is None
    why = why_none(ROWS, spec)
    assert "within select.max_ms_per_image 0.5 ms" in why and "fastest, fast, takes 1 ms/image" in why
    assert "--resume --max-ms-per-image" in why
    assert why_none([_row("failed", None, None, "error")], spec) == "no trial finished"


def test_the_front_is_optunas_pareto_front_of_the_same_trials():
    rng = np.random.default_rng(0)
    aurocs = np.round(rng.uniform(0.8, 1.0, 60), 2)  # rounded: ties on the metric, as small val splits give
    ms = np.round(rng.lognormal(1.0, 1.0, 60), 1)
    rows = [_row(str(i), float(a), float(m)) for i, (a, m) in enumerate(zip(aurocs, ms, strict=True))]
    study = optuna.create_study(directions=["maximize", "minimize"])
    for a, m in zip(aurocs, ms, strict=True):
        study.add_trial(optuna.trial.create_trial(values=[float(a), float(m)]))
    ours = sorted((r.metric, r.ms_per_image) for r in front(rows, parse_spec(TIMED)))
    assert ours == sorted(set((t.values[0], t.values[1]) for t in study.best_trials))


# --- the time itself -----------------------------------------------------------------------------------------


def test_scoring_time_is_measured_on_the_engine_a_replica_would_use(trained_ws):
    ws = Workspace.open(trained_ws)
    X = pool_arrays(ws, 32).X[:8]
    for engine, used in (("torch", "torch"), ("onnx", "onnxruntime"), ("auto", "onnxruntime")):
        t = time_scoring(ws.model_dir(0), X, engine=engine, batch_size=2, repeats=3, threads=1)
        assert t.engine == used and len(t.passes_ms) == 3 and t.images == 8 and t.batch_size == 2
        assert t.ms_per_image == sorted(t.passes_ms)[1] > 0  # the median pass
        assert "batch 2, median of 3 passes over 8 images" in t.describe()


def test_a_model_that_does_not_export_is_timed_on_torch_unless_onnx_is_asked_for(solder, tmp_path):
    det = Detector(tiny_config(epochs=1, local_stats="nearest", local_bank=20)).fit(solder.normals[:120])
    artifacts.save(det, tmp_path / "model", {})
    assert time_scoring(tmp_path / "model", solder.normals[:4], engine="auto", repeats=1).engine == "torch"
    with pytest.raises(ExportError, match="local_stats: nearest"):
        time_scoring(tmp_path / "model", solder.normals[:4], engine="onnx", repeats=1)


def test_timing_nothing_is_refused(trained_ws):
    ws = Workspace.open(trained_ws)
    with pytest.raises(ValueError, match="no images"):
        time_scoring(ws.model_dir(0), np.zeros((0, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="batch_size and repeats must be >= 1"):
        time_scoring(ws.model_dir(0), pool_arrays(ws, 32).X[:2], repeats=0)


# --- a real search: Ray Tune + Optuna on two objectives ------------------------------------------------------


@pytest.fixture(scope="module")
def timed_search(ray_local, synthetic_ws, tmp_path_factory):
    from aae_ray.tuning.runner import run_tune

    root = tmp_path_factory.mktemp("timed") / "ws"
    shutil.copytree(synthetic_ws, root)
    spec = parse_spec({
        "num_samples": 4, "max_concurrent": 2, "searcher": {"n_startup_trials": 2, "seed": 0},
        "report": {"anomaly_ratio_sweep": False}, "latency": {"images": 16, "repeats": 2},
        "space": {"base_channels": {"choice": [4, 32]}, "local_dim": {"choice": [8, 64]}},
        "fixed": {"epochs": 1, "batch_size": 64, "fc_units": 32, "latent_dim": 8, "input_size": 32},
    })
    lines: list[str] = []
    outcome = run_tune(Workspace.open(root), spec, round_no=0, echo=lines.append)
    return Workspace.open(root), spec, outcome, lines


def test_a_latency_search_times_every_trial_and_tells_optuna_both_objectives(timed_search):
    ws, spec, outcome, lines = timed_search
    assert len(outcome.rows) == 4 and all(r.status == "complete" for r in outcome.rows)
    assert all(r.ms_per_image > 0 and r.latency_engine == "onnxruntime" for r in outcome.rows)
    study = optuna.load_study(study_name="aae-ray-r000", storage=f"sqlite:///{outcome.experiment / 'optuna.sqlite3'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    told = sorted(tuple(t.values) for t in study.trials)
    assert told == sorted((r.metric, r.ms_per_image) for r in outcome.rows)
    assert any("objectives: val_auroc (max) and ms_per_image (min; auto engine, batch 1" in ln for ln in lines)


def test_a_latency_search_writes_its_front_and_the_chosen_models_time(timed_search):
    ws, spec, outcome, _ = timed_search
    report = ws.round_dir(0) / "report"
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((report / "pareto.json").read_text())
    on_front = front(outcome.rows, spec)
    assert [t["trial"] for t in written["front"]] == [r.trial_id for r in on_front] and on_front
    assert written["chosen"] == outcome.best.trial_id == choose(outcome.rows, spec).trial_id
    summary = json.loads((ws.round_dir(0) / "tune_summary.json").read_text())
    assert [t["trial"] for t in summary["pareto"]] == [r.trial_id for r in on_front]
    m = artifacts.read_metrics(ws.model_dir(0))
    assert m["ms_per_image"] == outcome.best.ms_per_image and m["latency_engine"] == "onnxruntime"


def test_status_shows_the_chosen_models_time_and_the_front(timed_search, capsys):
    ws, spec, outcome, _ = timed_search
    assert run_cli("status", ws.root) == 0
    out = capsys.readouterr().out
    assert "latency: best scores in " in out and "(no budget)" in out
    assert f"front of {len(front(outcome.rows, spec))} trials: " in out


def test_resume_with_a_budget_chooses_again_from_the_same_trials(timed_search, tmp_path, capsys):
    ws, spec, outcome, _ = timed_search
    root = Path(shutil.copytree(ws.root, tmp_path / "ws"))
    fastest = min(outcome.rows, key=lambda r: r.ms_per_image)
    assert run_cli("tune", root, "--resume", "--max-ms-per-image", fastest.ms_per_image / 2) == 2
    assert f"the fastest, {fastest.trial_id}" in capsys.readouterr().err
    assert run_cli("tune", root, "--resume", "--max-ms-per-image", fastest.ms_per_image) == 0
    again = Workspace.open(root)
    assert artifacts.read_metrics(again.model_dir(0))["trial"] == fastest.trial_id
    assert "within" in capsys.readouterr().out
    if fastest.trial_id != outcome.best.trial_id:  # another model now serves round 0: the pointer says so
        assert "chosen from the round's 4 trials" in again.current()["reason"]


def test_a_rounds_warm_start_over_the_budget_is_left_out(trained_ws, tmp_path):
    from aae_ray.rounds import WARM_MODEL, _warm_candidate

    ws = Workspace.open(shutil.copytree(trained_ws, tmp_path / "ws"))
    lines: list[str] = []
    tight = parse_spec({**TIMED, "select": {"max_ms_per_image": 1e-6}, "round": {"warm_start_epochs": 1}})
    assert _warm_candidate(ws, 1, tight, lines.append) is None
    assert not (ws.round_dir(1) / WARM_MODEL).exists()
    assert "warm start left out: " in lines[-1] and "over the 1e-06 ms budget" in lines[-1]
    roomy = parse_spec({**TIMED, "select": {"max_ms_per_image": 1e6}, "round": {"warm_start_epochs": 1}})
    assert _warm_candidate(ws, 1, roomy, lines.append) == ws.round_dir(1) / WARM_MODEL

"""`aae-ray tune`: the spec's validation, what trials train and are judged on, and a real Ray Tune + Optuna run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pytest
from conftest import POISONED_LR, run_cli

from aae_ray import artifacts
from aae_ray.config import ConfigError
from aae_ray.data.images import read_table, write_table
from aae_ray.tuning import trial_data
from aae_ray.tuning.spec import SpecError, load_spec, parse_spec
from aae_ray.tuning.trial_data import build_trial_data
from aae_ray.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (REPO / "tune_configs").glob("*.yaml") if not p.name.startswith("cluster"))
TINY_FIXED = {"epochs": 2, "batch_size": 64, "base_channels": 8, "fc_units": 32, "input_size": 32}


# --- the spec ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_tune_config_is_valid(path):
    spec = load_spec(path)
    assert spec.num_samples >= 1 and spec.space


def test_the_gpu_config_shares_each_gpu_among_four_trials():
    assert load_spec(REPO / "tune_configs" / "gpu_cluster.yaml").resources.gpu == 0.25


def test_the_solder_config_searches_the_source_research_space():
    space = load_spec(REPO / "tune_configs" / "solder.yaml").space
    assert space["conv_blocks"].int_ == (2, 5)
    assert space["latent_dim"].int_ == (2, 32)
    assert space["input_size"].choice == [32, 64, 128]
    assert space["anomaly_ratio"].choice == [0, 0.001, 0.005, 0.01, 0.02]
    assert space["defect_loss"].choice == ["none", "push"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
        ({"metric": "accuracy"}, "metric: Input should be 'val_auroc' or 'val_auprc'"),
        ({"resources": {"cpu": 0}}, "resources.cpu: Input should be greater than 0"),
        ({"space": {"latent_dim": {"int": [1, 32]}}}, "space.latent_dim = 1: latent_dim: Input should be greater"),
        ({"space": {"latent_dim": {"int": [32, 2]}}}, "space.latent_dim: Value error, lower bound 32 is above"),
        ({"space": {"lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "give exactly one of choice, int, uniform"),
        ({"space": {"lr": {"loguniform": [0, 0.1]}}}, "loguniform bounds must be positive"),
        ({"space": {"input_size": {"choice": [32, 48]}}}, "space.input_size = 48: input_size: Input should be 32"),
        ({"space": {"depth": {"int": [2, 4]}}}, "space.depth: not a model field"),
        ({"fixed": {"epochs": 0}}, "fixed.epochs: Input should be greater than or equal to 1"),
        ({"fixed": {"num_threads": 4}}, "fixed.num_threads: set by resources.cpu"),
        ({"space": {"lr": {"choice": [1e-3]}}, "fixed": {"lr": 1e-3}}, "lr: both searched (space) and fixed"),
        ({"scheduler": {"grace": 2}}, "scheduler.grace: Extra inputs are not permitted"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key(values, message):
    with pytest.raises(SpecError) as err:
        parse_spec(values, where="my.yaml")
    assert str(err.value).startswith("my.yaml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("num_samples: 4\nspace:\n  lr: {choice: [1, 2}\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: not valid YAML at line 3"):
        load_spec(path)


def test_the_cli_reports_a_bad_spec_on_one_line_and_exits_2(synthetic_ws, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("space:\n  latent_dim: {int: [1, 4]}\n")
    assert run_cli("tune", synthetic_ws, "--config", path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-ray: error: ") and "space.latent_dim = 1" in err and "\n" not in err


def test_command_line_overrides_replace_the_spec_values(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("num_samples: 4\nmax_concurrent: 1\n")
    spec = load_spec(path, num_samples=16, max_concurrent=None)
    assert (spec.num_samples, spec.max_concurrent) == (16, 1)


def test_a_trial_gets_as_many_torch_threads_as_cpus():
    spec = parse_spec({"resources": {"cpu": 2}, "space": {"latent_dim": {"int": [4, 8]}}})
    assert spec.trial_config({"latent_dim": 5}).num_threads == 2


# --- what trials train and are judged on --------------------------------------------------------------------


def test_the_objective_is_the_val_split_when_it_holds_defects(synthetic_ws):
    data = build_trial_data(Workspace.open(synthetic_ws), [32])
    ws = Workspace.open(synthetic_ws)
    splits = ws.images().column("split").to_pylist()
    assert data.objective_source == "val"
    assert len(data.objective_y) == splits.count("val")
    assert len(data.y) == splits.count("train") + splits.count("pool")
    assert "val split" in data.describe()


def _without_val_defects(src: Path, dest: Path) -> Workspace:
    shutil.copytree(src, dest)
    ws = Workspace.open(dest)
    table = read_table(ws.images_path).to_pandas()
    table = table[~((table["split"] == "val") & (table["truth"] == 1))]
    write_table(pa.Table.from_pandas(table, preserve_index=False), ws.images_path)
    return ws


def test_without_labeled_val_defects_the_objective_is_synthetic_corruptions_of_held_out_normals(
    synthetic_ws, tmp_path, monkeypatch
):
    monkeypatch.setattr(trial_data, "MIN_SYNTHETIC", 10)  # the tiny workspace's val has 12 normals
    ws = _without_val_defects(synthetic_ws, tmp_path / "ws")
    data = build_trial_data(ws, [32, 64], seed=0)
    assert data.objective_source == "synthetic"
    assert "NO confirmed defects in val" in data.describe() and "synthetic corruptions" in data.describe()
    n = len(data.objective_y) // 2
    assert data.objective_y.tolist() == [0] * n + [1] * n
    for size in (32, 64):
        clean, broken = data.objective_X[size][:n], data.objective_X[size][n:]
        assert clean.shape == broken.shape == (n, 1, size, size)
        assert np.abs(clean - broken).mean(axis=(1, 2, 3)).min() > 0  # every copy really is corrupted
    val_normals = ws.images().column("split").to_pylist().count("val")
    assert n == val_normals  # the val normals were enough: nothing held out of training
    assert len(data.y) == sum(s in ("train", "pool") for s in ws.images().column("split").to_pylist())


def test_with_too_few_val_normals_normals_are_held_out_of_training_instead(synthetic_ws, tmp_path):
    ws = _without_val_defects(synthetic_ws, tmp_path / "ws")  # 12 val normals, fewer than MIN_SYNTHETIC
    data = build_trial_data(ws, [32])
    n_train_pool = sum(s in ("train", "pool") for s in ws.images().column("split").to_pylist())
    assert data.objective_source == "synthetic"
    assert len(data.y) == n_train_pool - trial_data.MIN_SYNTHETIC


def test_with_no_val_at_all_normals_are_held_out_of_training_for_the_objective(synthetic_ws, tmp_path):
    shutil.copytree(synthetic_ws, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    table = read_table(ws.images_path).to_pandas()
    write_table(pa.Table.from_pandas(table[table["split"] != "val"], preserve_index=False),
                ws.images_path)
    data = build_trial_data(ws, [32])
    n_train_pool = sum(s in ("train", "pool") for s in ws.images().column("split").to_pylist())
    n_held = len(data.objective_y) // 2
    assert data.objective_source == "synthetic" and n_held >= 20
    assert len(data.y) == n_train_pool - n_held
    held = {x.tobytes() for x in data.objective_X[32][:n_held]}
    assert not held & {x.tobytes() for x in data.X[32]}  # held-out normals never train


# --- a real run: Ray Tune + Optuna, 4 trials, one of them forced to NaN -------------------------------------


@pytest.fixture(scope="module")
def tuned(ray_local, synthetic_ws, tmp_path_factory):
    from aae_ray.tuning.runner import run_tune

    root = tmp_path_factory.mktemp("tuned") / "ws"
    shutil.copytree(synthetic_ws, root)
    spec = parse_spec({
        "num_samples": 4, "max_concurrent": 2, "searcher": {"n_startup_trials": 2, "seed": 0},
        "scheduler": {"asha": False}, "report": {"anomaly_ratio_sweep": True},
        "space": {"latent_dim": {"int": [4, 12]}, "lr": {"loguniform": [5e-4, 3e-3]},
                  "anomaly_ratio": {"choice": [0, 0.02]}},
        "fixed": TINY_FIXED,
    })
    lines: list[str] = []
    outcome = run_tune(Workspace.open(root), spec, round_no=0, echo=lines.append,
                       initial_points=[{"latent_dim": 6, "lr": POISONED_LR, "anomaly_ratio": 0}])
    return Workspace.open(root), spec, outcome, lines


@pytest.mark.slow
def test_a_tune_run_exports_the_best_trial_as_a_loadable_round_model(tuned):
    ws, spec, outcome, _ = tuned
    assert len(outcome.rows) == 4 and not outcome.interrupted
    best = outcome.best
    finished = [r for r in outcome.rows if r.status == "complete"]
    assert best is not None and best.metric == max(r.metric for r in finished)
    det = artifacts.load(ws.model_dir(0))
    m = artifacts.read_metrics(ws.model_dir(0))
    assert m["round"] == 0 and m["trial"] == best.trial_id and len(m["data_fingerprint"]) == 16
    assert 0.0 <= m["val_auroc"] <= 1.0 and 0.0 <= m["test_auroc"] <= 1.0
    assert m["objective"] == pytest.approx(m["val_auroc"])  # the objective was the val split's AUROC
    assert det.config.latent_dim == best.params["latent_dim"] and det.config.epochs == 2
    assert ws.current() == {**ws.current(), "round": 0, "model": "rounds/r000/model"}


@pytest.mark.slow
def test_a_trial_that_goes_nan_fails_with_its_reason_and_the_run_goes_on(tuned):
    ws, _, outcome, lines = tuned
    failed = [r for r in outcome.rows if r.status == "error"]
    assert len(failed) == 1 and failed[0].params["lr"] == pytest.approx(POISONED_LR)
    assert "training diverged at epoch 2" in failed[0].error
    assert any("FAILED: " in ln and "diverged" in ln for ln in lines)
    assert sum(r.status == "complete" for r in outcome.rows) == 3
    study = optuna.load_study(study_name="aae-ray-r000", storage=f"sqlite:///{outcome.experiment / 'optuna.sqlite3'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.slow
def test_every_epoch_is_reported_with_the_objective_and_trials_use_their_cpu_share(tuned):
    _, _, outcome, lines = tuned
    results = [json.loads(line) for p in outcome.experiment.glob("train_trial_*/result.json")
               for line in p.read_text().splitlines()]
    finished = [r for r in results if r.get("epoch") == 2]
    assert len(finished) == 3
    assert all(r["threads"] == 1 and r["objective_source"] == "val" and math.isfinite(r["val_auroc"])
               for r in finished)
    assert sum("epoch 1/2" in ln for ln in lines) == 3  # live progress; the poisoned trial never reports


@pytest.mark.slow
def test_a_tune_run_writes_its_report_and_summary(tuned):
    ws, _, outcome, _ = tuned
    report = ws.round_dir(0) / "report"
    for name in ("roc.png", "t2_histogram.png", "importances.png", "trials.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((ws.round_dir(0) / "tune_summary.json").read_text())
    assert summary["best"]["trial"] == outcome.best.trial_id
    assert summary["trials"] == {"complete": 3, "error": 1}
    assert [t["status"] for t in summary["top"]][-1] == "error"  # failed trials rank last


@pytest.mark.slow
def test_the_best_architecture_is_retrained_at_each_anomaly_ratio_for_the_report(tuned):
    ws, _, outcome, _ = tuned
    sweep = [json.loads(p.read_text().splitlines()[-1]) for p in (ws.round_dir(0) / "sweep").glob("*/result.json")]
    assert len(sweep) == 1  # the other ratio of {0, 0.02}; the best trial's own ratio is reused
    assert sweep[0]["config"]["latent_dim"] == outcome.best.params["latent_dim"]
    assert {sweep[0]["config"]["anomaly_ratio"], outcome.best.params["anomaly_ratio"]} == {0, 0.02}
    assert (ws.round_dir(0) / "report" / "roc_anomaly_ratio.png").exists()


@pytest.mark.slow
def test_status_shows_the_tuning_round(tuned, capsys):
    ws, _, outcome, _ = tuned
    assert run_cli("status", ws.root) == 0
    out = capsys.readouterr().out
    assert f"tune: 4 trials (3 complete, 1 error), best {outcome.best.trial_id}" in out
    assert "report:" in out


@pytest.mark.slow
def test_the_demo_tunes_scores_and_summarises(ray_local, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({"num_samples": 2, "max_concurrent": 2, "scheduler": {"asha": False},
                                "space": {"latent_dim": {"choice": [4, 8]}, "anomaly_ratio": {"choice": [0, 0.01]}},
                                "fixed": TINY_FIXED}))  # JSON is YAML
    assert run_cli("demo", tmp_path / "demo", "--config", spec) == 0
    out = capsys.readouterr().out
    assert "== 2/4 tune round 0" in out and "tuned round 0" in out and "promoted" in out
    assert "the labeler confirmed" in out and "round 1:" in out and "warm start" in out
    assert json.loads((tmp_path / "demo" / "rounds" / "r001" / "round.json").read_text())["candidate"] == "warm"
    assert "over HTTP (" in out and "the endpoint is stopped" in out  # it ends by serving and scoring over HTTP
    assert "round 0's best trial had test AUROC 0." in out
    summary = out.strip().splitlines()[-1]  # the demo's one-line summary: AUROC, TPR at the threshold, what next
    assert summary.startswith("demo done: the promoted model") and "test image AUROC 0." in summary
    assert "of the test defects with" in summary and "aae-ray label" in summary and "aae-ray serve" in summary
    assert (tmp_path / "demo" / "rounds" / "r000" / "scores.parquet").exists()
    assert (tmp_path / "demo" / "rounds" / "r001" / "scores.parquet").exists()


@pytest.mark.slow
def test_a_trial_whose_worker_dies_is_retried_and_finishes(ray_local, synthetic_ws, tmp_path):
    """FailureConfig: the worker process of a running trial is killed; the trial starts again and completes."""
    import os
    import signal
    import threading

    from aae_ray.tuning.runner import run_tune

    shutil.copytree(synthetic_ws, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    spec = parse_spec({"num_samples": 1, "max_concurrent": 1, "max_failures": 2, "scheduler": {"asha": False},
                       "report": {"anomaly_ratio_sweep": False}, "space": {"latent_dim": {"choice": [6]}},
                       "fixed": {**TINY_FIXED, "epochs": 8}})
    killed: list[int] = []

    def kill_the_worker_after_its_first_epoch() -> None:
        for _ in range(600):
            for result in (ws.round_dir(0) / "tune").glob("train_trial_*/result.json"):
                lines = result.read_text().splitlines()
                if lines:
                    pid = json.loads(lines[0])["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            threading.Event().wait(0.1)

    watcher = threading.Thread(target=kill_the_worker_after_its_first_epoch, daemon=True)
    watcher.start()
    outcome = run_tune(ws, spec, round_no=0, echo=lambda _: None)
    watcher.join(timeout=1)
    assert killed, "the trial never reported an epoch"
    assert [r.status for r in outcome.rows] == ["complete"]
    results = [json.loads(line) for line in next((ws.round_dir(0) / "tune").glob("train_trial_*/result.json"))
               .read_text().splitlines()]
    assert {r["pid"] for r in results} - set(killed)  # a new worker finished the trial
    assert results[-1]["epoch"] == 8

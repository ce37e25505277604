"""Thresholds from images known to be normal: presumed normals (the pool) train the model but never set its
limit; too few known normals is said plainly and falls back; later labels recalibrate without retraining."""

import hashlib
import json
import logging

import numpy as np
import pyarrow.parquet as pq
from conftest import TINY_SET, run_cli, tiny_config

from aae_ray import artifacts, labels
from aae_ray.detector import Detector
from aae_ray.scoring import ScoreLimit, describe_basis, needed_for_rank
from aae_ray.workspace import Workspace


def test_the_conformal_rank_needs_99_normals_at_alpha_001():
    assert needed_for_rank(0.01) == 99
    assert needed_for_rank(0.05) == 19


def test_presumed_normals_train_the_model_but_never_calibrate_it(solder):
    X = solder.normals[:200]
    known = np.zeros(len(X), dtype=bool)
    known[:60] = True
    det = Detector(tiny_config(epochs=1, calibration_fraction=0.4)).fit(X, known=known, X_calibration=X[:1])
    assert set(det.calibration_idx_.tolist()) <= set(range(60))
    assert len(det.calibration_idx_) == 24
    assert det.n_train_ == 200 - 24  # every presumed normal trained
    assert det.limit_.n_heldout == 24 + 1  # the held-out known normals and X_calibration


def test_too_few_known_normals_fall_back_and_say_so(solder, caplog):
    X = solder.normals[:200]
    with caplog.at_level(logging.WARNING, logger="aae_ray.detector"):
        det = Detector(tiny_config(epochs=1, calibration_fraction=0.2)).fit(X)
    assert det.limit_.n_heldout == 40 < 99
    assert det.limit_.method == "train_quantile"
    assert "only 40 known normals" in caplog.text and "needs 99" in caplog.text
    glob = det.rescored(X, score="global")
    assert glob.limit_.method == "f_ucl" and glob.limit_.n_heldout == 40
    assert "F limit" in glob.limit_.describe()


def test_the_training_quantile_fallback_leaves_out_the_top_trim_share():
    normal = np.arange(100, dtype=float)
    hidden_defects = np.full(20, 1000.0)
    train = np.concatenate([normal, hidden_defects])
    plain = ScoreLimit.fit(train, None, alpha=0.05)
    trimmed = ScoreLimit.fit(train, None, alpha=0.05, trim=20 / 120)
    assert plain.threshold == 1000.0
    assert trimmed.method == "train_quantile" and trimmed.threshold < 100


def test_describe_basis_names_the_basis_and_the_count():
    assert "calibrated on 150 known normals" in describe_basis("calibrated", 150, 0.01)
    line = describe_basis("f_ucl", 12, 0.01)
    assert "F limit" in line and "only 12" in line and "needs 99" in line and "aae-ray recalibrate" in line


def _trained(ws_copy):
    assert run_cli("train", ws_copy, "--epochs", "1", *TINY_SET, "--no-progress") == 0
    return Workspace.open(ws_copy)


def test_a_pool_with_hidden_defects_never_enters_the_calibration_set(ws_copy):
    ws = _trained(ws_copy)
    table = ws.images().select(["id", "split", "truth"]).to_pylist()
    split = {r["id"]: r["split"] for r in table}
    truth = {r["id"]: r["truth"] for r in table}
    assert any(truth[i] == 1 for i in split if split[i] == "pool")  # the synthetic pool hides defects
    trained = artifacts.read_trained_on(ws.current_model_dir())
    training_ids = {i for i, s in split.items() if s in ("train", "pool")}
    held_out = training_ids - trained
    assert held_out and all(split[i] == "train" and truth[i] == 0 for i in held_out)
    assert {i for i, s in split.items() if s == "pool"} <= trained
    val_normals = sum(1 for i, s in split.items() if s == "val" and truth[i] == 0)
    m = artifacts.read_metrics(ws.current_model_dir())
    assert m["n_calibration"] == len(held_out) + val_normals
    assert m["threshold_basis"] in ("calibrated", "train_quantile", "train_max", "f_ucl")


def test_recalibration_after_new_normal_labels_moves_the_threshold_not_the_weights(ws_copy, capsys):
    ws = _trained(ws_copy)
    model = ws.current_model_dir()
    weights = hashlib.sha1((model / "weights.safetensors").read_bytes()).hexdigest()
    before = artifacts.read_metrics(model)
    old_ids = set(ws.images().column("id").to_pylist())
    assert run_cli("init", ws_copy, "--source", "synthetic", "--seed", "7", "--n-normal", "160", "--n-defect", "4",
                   "--size", "32") == 0
    rows = [r for r in ws.images().select(["id", "split", "truth"]).to_pylist() if r["id"] not in old_ids]
    new_pool = [r["id"] for r in rows if r["split"] == "pool"]
    trained_pool = sorted(artifacts.read_trained_on(model) & {i for i in old_ids})[:3]
    # a person confirms new pool images as normal, and some the model trained on (those must not count)
    labels.append(ws.labels_dir, [labels.LabelEvent(i, "normal", "ann", 0) for i in new_pool + trained_pool])
    new_known = sum(1 for r in rows if r["split"] in ("train", "val") and r["truth"] == 0) + len(new_pool)
    capsys.readouterr()
    assert run_cli("recalibrate", ws_copy) == 0
    out = capsys.readouterr().out
    after = artifacts.read_metrics(model)
    assert after["n_calibration"] == before["n_calibration"] + new_known
    assert after["n_calibration"] >= 99 and after["threshold_basis"] == "calibrated"
    assert after["threshold"] != before["threshold"] and "weights untouched" in out
    assert hashlib.sha1((model / "weights.safetensors").read_bytes()).hexdigest() == weights
    score = json.loads((model / "score.json").read_text())
    assert score["threshold"] == after["threshold"] and score["n_calibration"] == after["n_calibration"]
    assert artifacts.load(model).threshold_ == after["threshold"]
    assert ws.current()["reason"].startswith("recalibrated on")
    assert pq.read_table(model / artifacts.TRAINED_ON).num_rows == len(artifacts.read_trained_on(model))
    run_cli("status", ws_copy)
    out = capsys.readouterr().out
    assert f"calibrated on {after['n_calibration']} known normals" in out
    # t2_trim: auto's estimate of the pool's hidden defects survives recalibration, and status says it
    assert "hidden defects:" in out and "presumed normals" in out
    assert artifacts.read_metrics(model)["contamination"]["n_pool"] > 0


def test_recalibrating_twice_with_nothing_new_changes_nothing(ws_copy, capsys):
    ws = _trained(ws_copy)
    assert run_cli("recalibrate", ws_copy) == 0
    pointer = ws.current_path.read_text()
    capsys.readouterr()
    assert run_cli("recalibrate", ws_copy) == 0
    assert "unchanged" in capsys.readouterr().out
    assert ws.current_path.read_text() == pointer

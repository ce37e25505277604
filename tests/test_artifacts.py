"""The model artifact (DESIGN.md "Model artifact"): a folder of safetensors + JSON that reloads to the same scores,
never unpickles, and fails on a damaged folder with an ArtifactError that names the problem."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import tiny_config

from aae_ray import artifacts
from aae_ray.artifacts import ArtifactError
from aae_ray.detector import Detector
from aae_ray.scoring import f_ucl

DESIGN_FILES = {"weights.safetensors", "config.json", "t2.json", "score.json", "local.safetensors", "metrics.json"}
METRICS = {"round": 0, "val_auroc": 0.81, "test_auroc": None, "trial": None, "data_fingerprint": "abc"}


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory) -> Path:
    """The session's fitted detector saved once. Read-only: tests that damage it take `damaged`."""
    return artifacts.save(fitted, tmp_path_factory.mktemp("artifact") / "model", METRICS)


@pytest.fixture
def damaged(saved, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(saved, dest)
    return dest


# --- round trip ----------------------------------------------------------------------------------------------


def test_load_gives_identical_scores(fitted, saved, solder):
    back = artifacts.load(saved)
    X = solder.X[::3]
    a, b = fitted.score(X), back.score(X)
    np.testing.assert_array_equal(b.t2, a.t2)
    np.testing.assert_array_equal(b.p_value, a.p_value)
    np.testing.assert_array_equal(b.anomaly, a.anomaly)
    np.testing.assert_array_equal(back.reconstruct(X), fitted.reconstruct(X))
    assert back.threshold_ == fitted.threshold_


def test_load_restores_the_config_and_t2_statistics(fitted, saved):
    back = artifacts.load(saved)
    assert back.config == fitted.config
    np.testing.assert_array_equal(back.hotelling_.mean, fitted.hotelling_.mean)
    np.testing.assert_array_equal(back.hotelling_.precision, fitted.hotelling_.precision)
    assert (back.hotelling_.n, back.hotelling_.p, back.hotelling_.alpha) == (
        fitted.hotelling_.n, fitted.hotelling_.p, fitted.hotelling_.alpha)


def test_a_calibrated_threshold_survives_the_round_trip(solder, tmp_path):
    det = Detector(tiny_config(epochs=1, calibration_fraction=0.3)).fit(solder.normals)
    assert det.limit_.method == "calibrated"
    back = artifacts.load(artifacts.save(det, tmp_path / "m", METRICS))
    assert back.limit_.method == "calibrated"
    score = json.loads((tmp_path / "m" / "score.json").read_text())
    assert (score["primary"], score["threshold_basis"], score["n_calibration"]) == ("combined", "calibrated", 102)
    assert back.threshold_ == det.threshold_
    X = solder.X[::4]
    np.testing.assert_array_equal(back.score(X).p_value, det.score(X).p_value)


def test_loaded_model_is_in_eval_mode(saved):
    assert not artifacts.load(saved).model_.training


# --- the folder -------------------------------------------------------------------------------------------------


def test_folder_holds_exactly_the_design_files(saved):
    assert {p.name for p in saved.iterdir()} == DESIGN_FILES


def test_no_temp_folder_is_left_beside_the_artifact(saved):
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_weights_are_a_safetensors_state_dict(fitted, saved):
    state = safetensors.torch.load_file(saved / "weights.safetensors")
    expected = fitted.model_.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_t2_json_holds_the_design_fields(saved, fitted):
    t2 = json.loads((saved / "t2.json").read_text())
    assert {"mean", "precision", "n", "p", "alpha", "threshold"} <= t2.keys()
    assert len(t2["mean"]) == t2["p"] == fitted.config.latent_dim
    assert t2["threshold"] == fitted.hotelling_.threshold == pytest.approx(f_ucl(fitted.n_train_, 32, 0.01))


def test_metrics_json_keeps_the_given_metrics_and_library_versions(saved):
    m = artifacts.read_metrics(saved)
    assert {k: m[k] for k in METRICS} == METRICS
    assert {"aae_ray", "torch", "numpy", "python"} <= m["versions"].keys()


def test_nan_metrics_are_written_as_null(fitted, tmp_path):
    """JSON has no NaN: a metric that could not be computed is null, and numpy numbers become plain numbers."""
    folder = artifacts.save(fitted, tmp_path / "m", {"round": np.int64(2), "val_auroc": float("nan"),
                                                     "test_auroc": np.float32("nan"),
                                                     "test": {"auprc": np.float64(0.5), "tpr": float("inf")}})
    text = (folder / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    assert (m["round"], m["val_auroc"], m["test_auroc"], m["test"]) == (2, None, None, {"auprc": 0.5, "tpr": None})


def test_saving_over_an_artifact_replaces_it(fitted, solder, tmp_path):
    folder = artifacts.save(fitted, tmp_path / "m", {"round": 0})
    (folder / "stale.txt").write_text("from before")
    other = Detector(tiny_config(epochs=1)).fit(solder.normals[:150])
    artifacts.save(other, folder, {"round": 1})
    assert {p.name for p in folder.iterdir()} == DESIGN_FILES
    assert artifacts.read_metrics(folder)["round"] == 1
    assert artifacts.load(folder).config == other.config


# --- damaged folders --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DESIGN_FILES))
def test_a_missing_file_is_an_artifact_error_naming_it(damaged, name):
    (damaged / name).unlink()
    with pytest.raises(ArtifactError, match=f"is not a model artifact: missing {name}"):
        artifacts.load(damaged)


def test_a_folder_that_does_not_exist_is_an_artifact_error(tmp_path):
    missing = "missing weights.safetensors, config.json, t2.json, score.json, metrics.json"
    with pytest.raises(ArtifactError, match=missing):
        artifacts.load(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["config.json", "t2.json"])
def test_invalid_json_is_an_artifact_error_naming_the_file(damaged, name):
    (damaged / name).write_text('{"latent_dim": 16,')
    with pytest.raises(ArtifactError, match=rf"{name}: not valid JSON"):
        artifacts.load(damaged)


def test_invalid_metrics_json_is_an_artifact_error(damaged):
    (damaged / "metrics.json").write_text("{")
    with pytest.raises(ArtifactError, match="metrics.json: not valid JSON"):
        artifacts.read_metrics(damaged)


def test_weights_of_another_architecture_are_an_artifact_error(damaged):
    cfg = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**cfg, "latent_dim": 12}))
    with pytest.raises(ArtifactError, match="weights do not match config.json"):
        artifacts.load(damaged)


class _Tripwire:
    """Unpickling this touches a file: the proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_weights_are_never_unpickled(damaged, tmp_path):
    marker = tmp_path / "unpickled"
    (damaged / "weights.safetensors").write_bytes(pickle.dumps({"encoder.fc.0.weight": _Tripwire(marker)}))
    with pytest.raises(Exception):  # noqa: B017 -- which error is the next test's concern; here: no code ran
        artifacts.load(damaged)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[: len(data) // 2], lambda data: b"", lambda data: b"garbage", lambda data: b"\x80\x04K\x01."],
    ids=["truncated", "empty", "garbage", "pickle"],
)
def test_corrupt_weights_are_an_artifact_error(damaged, damage):
    path = damaged / "weights.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        artifacts.load(damaged)


@pytest.mark.parametrize("content", ['{"n": 3}', "[1, 2]"], ids=["missing-keys", "not-an-object"])
def test_incomplete_t2_json_is_an_artifact_error(damaged, content):
    (damaged / "t2.json").write_text(content)
    with pytest.raises(ArtifactError, match="t2.json"):
        artifacts.load(damaged)


def test_t2_statistics_of_another_latent_size_are_an_artifact_error(damaged):
    t2 = json.loads((damaged / "t2.json").read_text())
    t2.update(mean=[0.0, 0.0], precision=[[1.0, 0.0], [0.0, 1.0]], p=2)
    (damaged / "t2.json").write_text(json.dumps(t2))
    with pytest.raises(ArtifactError, match="t2.json"):
        artifacts.load(damaged)

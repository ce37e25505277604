"""Rounds: the simulated labeler answers the queue, a round tunes from the labels, compares and promotes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli

from aae_ray import artifacts, rounds
from aae_ray.labels import current_labels, read_events
from aae_ray.tuning.spec import parse_spec
from aae_ray.workspace import Workspace

TINY_SPEC = {"num_samples": 2, "max_concurrent": 2, "scheduler": {"asha": False},
             "report": {"anomaly_ratio_sweep": False},
             "space": {"latent_dim": {"choice": [4, 8]}, "anomaly_ratio": {"choice": [0, 0.02]}},
             "fixed": {"epochs": 2, "batch_size": 64, "base_channels": 8, "fc_units": 32, "input_size": 32}}


@pytest.fixture
def scored_copy(scored_copy_path) -> Workspace:
    return Workspace.open(scored_copy_path)


def test_the_simulated_labeler_answers_the_queue_in_order_from_the_truth(scored_copy):
    ws = scored_copy
    truth = dict(zip(ws.images().column("id").to_pylist(), ws.images().column("truth").to_pylist(), strict=True))
    queue = pq.read_table(ws.round_dir(0) / "scores.parquet").column("id").to_pylist()
    first = rounds.answer_queue(ws, 5)
    second = rounds.answer_queue(ws, 5)
    assert first.ids == queue[:5] and second.ids == queue[5:10]  # the queue's order, nothing labeled twice
    labels = current_labels(ws.labels_dir)
    assert all(labels[i] == ("defect" if truth[i] == 1 else "normal") for i in queue[:10])
    assert first.n_defects == sum(truth[i] == 1 for i in queue[:5])
    events = read_events(ws.labels_dir).to_pylist()
    assert {e["labeler"] for e in events} == {"oracle"} and {e["round"] for e in events} == {0}
    assert second.n_left == len(queue) - 10


def test_the_simulated_labeler_needs_a_queue(synthetic_ws, tmp_path):
    shutil.copytree(synthetic_ws, tmp_path / "ws")
    with pytest.raises(ValueError, match="no labeling queue"):
        rounds.answer_queue(Workspace.open(tmp_path / "ws"), 5)


# --- the promotion rule: a paired comparison with its uncertainty --------------------------------------------------

Y = np.r_[np.zeros(80), np.ones(16)].astype(np.int8)  # the size of the demo's val judging set


def _scores(separation: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=len(Y)) + separation * Y


def test_a_gain_inside_the_noise_of_the_judging_set_keeps_the_model():
    old = _scores(1.5, 0)
    new = old + np.random.default_rng(1).normal(scale=0.3, size=len(Y))  # a slightly different, not better model
    promoted, why, cmp = rounds.decide(Y, new, old)
    assert not promoted and cmp.low <= 0 <= cmp.high
    assert "no clear gain" in why and f"{cmp.new_auroc:.4f} vs {cmp.old_auroc:.4f}" in why


def test_a_clear_gain_promotes_and_says_by_how_much():
    old, new = _scores(0.5, 0), _scores(3.0, 0)
    promoted, why, cmp = rounds.decide(Y, new, old)
    assert promoted and cmp.low > 0 and cmp.diff == pytest.approx(cmp.new_auroc - cmp.old_auroc)
    assert "a clear gain" in why and "95% interval" in why


def test_a_bare_higher_auroc_is_not_enough():
    old = _scores(1.0, 3)
    new = old.copy()
    new[np.flatnonzero(Y)[0]] += 0.5  # one defect ranked a little higher: a higher AUROC, by chance-sized noise
    promoted, _, cmp = rounds.decide(Y, new, old)
    assert cmp.new_auroc >= cmp.old_auroc and not promoted


def test_the_warm_start_begins_from_the_promoted_weights(scored_copy, monkeypatch):
    import aae_ray.detector

    ws = scored_copy
    promoted = artifacts.load(ws.current_model_dir())
    seen = {}
    real_fit = aae_ray.detector.fit_model

    def spy(model, *args, **kwargs):
        seen["equal"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                               promoted.model_.state_dict().values(), strict=True))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(aae_ray.detector, "fit_model", spy)
    folder = rounds._warm_candidate(ws, 1, parse_spec({"round": {"warm_start_epochs": 1}}), echo=lambda _: None)
    assert seen["equal"] is True
    warm = artifacts.load(folder)
    assert warm.config.epochs == 1 and any(
        not torch.equal(a, b) for a, b in zip(warm.model_.state_dict().values(),
                                              promoted.model_.state_dict().values(), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("separation", "promoted"), [(4.0, True), (None, False)])
def test_a_round_promotes_only_on_a_clear_paired_gain(ray_local, scored_copy, monkeypatch, separation, promoted):
    ws = scored_copy
    seen = {}
    old = _scores(1.0, 0)

    def judge(ws_, dirs, seed):
        seen["dirs"] = dirs
        new = old + 0.01 if separation is None else _scores(separation, 1)
        return rounds.Judging(Y, [new, old - 0.5, old], "val")  # the search's, the warm start's, the current's

    monkeypatch.setattr(rounds, "judge", judge)
    out = rounds.run_round(ws, parse_spec(TINY_SPEC), echo=lambda _: None)
    assert out.round_no == 1 and out.promoted is promoted and out.candidate == "search"
    # the search's model, the warm-started candidate and the current one, judged on the same images
    assert seen["dirs"] == [ws.model_dir(1), ws.round_dir(1) / rounds.WARM_MODEL, ws.model_dir(0)]
    assert ws.current()["round"] == (1 if promoted else 0)
    assert "interval" in out.reason and ("a clear gain" in out.reason) is promoted
    assert out.queue == ws.round_dir(1) / "scores.parquet" and out.queue.exists()  # a new queue either way
    record = json.loads((ws.round_dir(1) / "round.json").read_text())
    assert record["promoted"] is promoted and {"search", "warm_start", "judge", "total"} <= set(record["seconds"])
    first = json.loads((ws.round_dir(1) / "tune_spec.json").read_text())
    assert first["num_samples"] == 2


@pytest.mark.slow
def test_simulate_labels_then_runs_a_round(ray_local, scored_copy, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps(TINY_SPEC))
    assert run_cli("simulate", scored_copy.root, "--rounds", "1", "--labels-per-round", "6", "--config", spec) == 0
    out = capsys.readouterr().out
    assert "oracle labeled 6 of round 0's queue" in out and "simulated 1 round(s)" in out
    assert len(current_labels(scored_copy.labels_dir)) == 6
    assert run_cli("status", scored_copy.root) == 0
    status = capsys.readouterr().out
    assert "round 0 " in status or "round 0:" in status
    assert "labels on its queue: " in status  # what the oracle answered on round 0's queue
    assert (scored_copy.round_dir(1) / "scores.parquet").exists()
    # The report: the oracle's answers in order (its defects counted from the truth) and AUROC by round.
    report = json.loads((scored_copy.root / "report" / "active_learning.json").read_text())
    oracle = sorted(read_events(scored_copy.labels_dir).to_pylist(), key=lambda e: e["ts"])
    assert report["defects_found"] == [int(e["label"] == "defect") for e in oracle]
    assert len(report["test_auroc_by_round"]) == 2  # before the labels, and after round 1
    assert set(report["policy_curves"]) == {"highest", "diverse", "uncertain", "random (mean of 20)"}
    assert all(len(c) == 6 for c in report["policy_curves"].values())
    assert report["policy_curves"]["highest"][-1] == sum(report["defects_found"])  # same queue, same order
    assert (scored_copy.root / "report" / "active_learning.png").stat().st_size > 10_000

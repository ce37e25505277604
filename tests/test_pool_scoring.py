"""Ray Data pool scoring gives what in-process scoring gives, in the same order, whatever the batching."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TINY_SET, run_cli

from aae_ray import artifacts
from aae_ray.dataset import pool_arrays
from aae_ray.pool_scoring import PoolScores, score_pool, score_pool_ray
from aae_ray.workspace import Workspace


def in_process(ws: Workspace):
    det = artifacts.load(ws.current_model_dir())
    pool = pool_arrays(ws, det.config.input_size)
    return det, pool, det.score(pool.X)


def assert_same(got: PoolScores, ws: Workspace, with_codes: bool, ties: bool = False) -> None:
    """A pool image that is also one of the threshold's calibration normals (labeled normal and not trained on)
    ties with its own calibration score; the float noise of another batch size (1e-7 here, more under AnoGAN's
    search, `ties`) may land it on either side of that tie, moving its p-value by one calibration step. Only
    such images may differ, by at most that step; every other p-value and decision must match exactly."""
    det, pool, s = in_process(ws)
    assert len(pool) > 0
    assert got.ids == pool.ids
    np.testing.assert_allclose(got.t2, s.t2, rtol=1e-5)
    np.testing.assert_allclose(got.score, s.score, rtol=1e-5)
    cal = det.limit_.calibration
    step = 1 / (len(cal) + 1)
    tol = 1e-3 if ties else 1e-5
    tied = np.array([len(cal) > 0 and bool(np.isclose(cal, v, rtol=tol, atol=0).any()) for v in s.score])
    np.testing.assert_allclose(got.p_value[~tied], s.p_value[~tied], rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(got.anomaly[~tied], s.anomaly[~tied])
    assert np.abs(got.p_value[tied] - s.p_value[tied]).max(initial=0) <= step + 1e-12
    assert (got.anomaly[tied] != s.anomaly[tied]).sum() <= 1
    assert got.t2.dtype == np.float64 and got.anomaly.dtype == bool
    if with_codes:
        assert got.codes.shape == (len(pool), det.config.latent_dim)
        np.testing.assert_allclose(got.codes, det.encode(pool.X), rtol=1e-5, atol=1e-6)
    else:
        assert got.codes is None


def test_matches_in_process_scoring(scored_ws, ray_local):
    ws = Workspace.open(scored_ws)
    got = score_pool_ray(ws.images_path, ws.current_model_dir(), with_codes=True)
    assert_same(got, ws, with_codes=True)


def test_small_batches_on_two_actors_give_the_same_result(scored_ws, ray_local, capsys):
    """Also measures (prints, does not assert) images/s against in-process scoring: on the tiny test pool Ray Data's
    fixed costs (planning, starting the actors, loading the model in each) dominate."""
    ws = Workspace.open(scored_ws)
    t0 = time.perf_counter()
    got = score_pool_ray(ws.images_path, ws.current_model_dir(), batch_size=7, concurrency=2)
    t_ray = time.perf_counter() - t0
    assert len(got) > 2 * 7  # several batches, so both actors get work
    assert_same(got, ws, with_codes=False)
    t0 = time.perf_counter()
    in_process(ws)
    t_local = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\npool of {len(got)}: in-process {len(got) / t_local:,.0f} img/s ({t_local:.2f} s), "
              f"Ray Data (2 actors, batches of 7) {len(got) / t_ray:,.0f} img/s ({t_ray:.2f} s)")


@pytest.mark.parametrize("family", ["vae", "anogan"])
def test_a_family_model_scores_the_same_by_ray_data(family, ws_copy, ray_local):
    """Its primary score, not T2, ranks the queue: Ray Data's actors must return the same one."""
    assert run_cli("train", ws_copy, "--epochs", "2", *TINY_SET, f"--set=family={family}", "--set=anogan_steps=5",
                   "--no-progress") == 0
    ws = Workspace.open(ws_copy)
    got = score_pool_ray(ws.images_path, ws.current_model_dir(), batch_size=16, concurrency=2)
    assert not np.allclose(got.score, got.t2)  # the family's own score came back, not T2 under its name
    assert_same(got, ws, with_codes=False, ties=True)


def test_empty_pool_gives_empty_scores(trained_ws, tmp_path, ray_local):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(trained_ws, ws.root)
    table = pq.read_table(ws.images_path)
    pq.write_table(table.filter(pc.not_equal(table.column("split"), "pool")), ws.images_path)
    det = artifacts.load(ws.current_model_dir())
    got = score_pool_ray(ws.images_path, ws.current_model_dir(), with_codes=True)
    assert got.ids == [] and len(got) == 0
    assert got.t2.shape == got.p_value.shape == got.anomaly.shape == (0,)
    assert got.codes.shape == (0, det.config.latent_dim)


def test_missing_inputs_raise_naming_the_path(trained_ws, tmp_path):
    ws = Workspace.open(trained_ws)
    missing = tmp_path / "no-model"
    with pytest.raises(FileNotFoundError, match="no-model"):
        score_pool_ray(ws.images_path, missing)
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        score_pool_ray(tmp_path / "nothing.parquet", ws.current_model_dir())
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(artifacts.ArtifactError, match="broken"):
        score_pool_ray(ws.images_path, broken)


def test_actors_never_hold_every_cpu():
    """Actors that reserve every CPU leave Ray Data's read tasks unscheduled: the dataset hangs (seen: 2 on 2)."""
    from aae_ray.pool_scoring import _actor_cpus, _default_concurrency

    assert _actor_cpus({"CPU": 2.0}, 2) == 0.5
    assert _actor_cpus({"CPU": 16.0}, 4) == 1.0
    assert _actor_cpus({"CPU": 1.0}, 1) == 0.0
    assert _default_concurrency({"CPU": 2.0}, 0.0) == 2
    assert _default_concurrency({"CPU": 16.0, "GPU": 2.0}, 0.5) == 4


@pytest.mark.slow
def test_the_queue_is_the_same_whichever_engine_scores_the_pool(ray_local, scored_ws, tmp_path):
    shutil.copytree(scored_ws, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    _, local = score_pool(ws, engine="local")
    _, remote = score_pool(ws, engine="ray")
    assert local.column("id").to_pylist() == remote.column("id").to_pylist()
    np.testing.assert_allclose(local.column("t2").to_numpy(), remote.column("t2").to_numpy(), rtol=1e-5)

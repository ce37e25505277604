"""`aae-ray ingest`: the line's logged images join the pool once, and the next `aae-ray score` queues them."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from aae_ray.prediction_log import LogSettings, PredictionLog, content_id
from aae_ray.workspace import Workspace


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def log_line(ws: Workspace, n: int, *, flagged: set[int], at: datetime, station: str = "cam-1",
             images: str = "all") -> list[bytes]:
    """n served images, those in `flagged` answered as anomalies, logged as `aae-ray serve` logs them."""
    data = [png(1000 + i) for i in range(n)]
    results = [{"name": f"{i}.png", "score": float(i), "anomaly": i in flagged} for i in range(n)]
    log = PredictionLog(ws.predictions_dir, LogSettings(images=images))
    log.record(results, data, round_no=0, model="rounds/r000/model", station=station, ts=at)
    log.flush()
    return data


def pool_ids(ws: Workspace) -> set[str]:
    t = ws.images()
    return {i for i, s in zip(t.column("id").to_pylist(), t.column("split").to_pylist(), strict=True) if s == "pool"}


def test_flagged_line_images_join_the_pool_once_and_are_queued(scored_copy_path, capsys):
    ws = Workspace.open(scored_copy_path)
    before = pool_ids(ws)
    data = log_line(ws, 6, flagged={1, 4}, at=datetime.now(UTC))
    assert run_cli("ingest", scored_copy_path) == 0
    assert "2 new" in capsys.readouterr().out
    assert pool_ids(ws) - before == {content_id(data[1]), content_id(data[4])}
    table = ws.images()
    source = dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True))
    assert source[content_id(data[1])] == "line:cam-1"
    assert run_cli("ingest", scored_copy_path) == 0  # again: nothing new
    assert "0 new" in capsys.readouterr().out and len(pool_ids(ws)) == len(before) + 2
    assert run_cli("score", scored_copy_path) == 0
    queued = set(pq.read_table(ws.round_dir(0) / "scores.parquet", columns=["id"]).column("id").to_pylist())
    assert {content_id(data[1]), content_id(data[4])} <= queued


def test_all_since_and_sample_choose_which_logged_images(ws_copy, capsys):
    ws = Workspace.open(ws_copy)
    before = pool_ids(ws)
    old = log_line(ws, 4, flagged=set(), at=datetime(2026, 1, 1, tzinfo=UTC))
    new = log_line(ws, 4, flagged=set(), at=datetime(2026, 6, 1, tzinfo=UTC), station="cam-2")
    assert run_cli("ingest", ws_copy) == 0 and pool_ids(ws) == before  # nothing flagged
    assert run_cli("ingest", ws_copy, "--all", "--since", "2026-03-01") == 0
    assert pool_ids(ws) - before == {content_id(d) for d in new}
    assert run_cli("ingest", ws_copy, "--sample", "0.5", "--seed", "3") == 0  # half of all 8: 4, some already in
    added = pool_ids(ws) - before - {content_id(d) for d in new}
    assert added <= {content_id(d) for d in old} and len(added) <= 4
    capsys.readouterr()


def test_images_logged_without_their_bytes_cannot_be_ingested(ws_copy, capsys):
    ws = Workspace.open(ws_copy)
    before = pool_ids(ws)
    log_line(ws, 3, flagged={0, 1, 2}, at=datetime.now(UTC) - timedelta(minutes=1), images="none")
    assert run_cli("ingest", ws_copy, "--all") == 0
    assert pool_ids(ws) == before and "0 line image(s)" in capsys.readouterr().out


def test_a_bad_since_or_sample_is_one_line(ws_copy, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("ingest", ws_copy, "--since", "yesterday")
    assert info.value.code == 2 and "not an ISO 8601 time: 'yesterday'" in capsys.readouterr().err
    assert run_cli("ingest", ws_copy, "--sample", "2") == 2
    assert "--sample must be in (0, 1]" in capsys.readouterr().err

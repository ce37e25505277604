"""`aae-ray ingest`: the line's logged images join the pool once, and the next `aae-ray score` queues them; `aae-ray
round --ingest` does it before the round; `importing.line(ids=...)` and `rounds.enqueue` send chosen ones to labeling
at once."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from aae_ray import importing, rounds
from aae_ray.prediction_log import LogSettings, PredictionLog, content_id
from aae_ray.workspace import Workspace


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def log_line(ws: Workspace, n: int, *, flagged: set[int], at: datetime, station: str = "cam-1",
             images: str = "all", seed: int = 1000) -> list[bytes]:
    """n served images, those in `flagged` answered as anomalies, logged as `aae-ray serve` logs them."""
    data = [png(seed + i) for i in range(n)]
    results = [{"name": f"{i}.png", "score": float(i), "t2": 10.0 + i, "t2_local": 20.0 + i, "p_value": 0.5 / (i + 1),
                "threshold": 3.5, "anomaly": i in flagged} for i in range(n)]
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


def test_line_with_ids_ingests_only_those_flagged_or_not(ws_copy):
    ws = Workspace.open(ws_copy)
    before = pool_ids(ws)
    data = log_line(ws, 5, flagged={0}, at=datetime.now(UTC), station="cam-3")
    wanted = [content_id(data[2]), content_id(data[3])]
    out = importing.line(ws_copy, ids=[*wanted, "folder-not-logged"], echo=lambda _: None)
    assert pool_ids(ws) - before == set(wanted)  # not the flagged one, which `which` alone would take
    assert out.n_added == 2 and [s["path"] for s in out.skipped] == ["predictions/folder-not-logged"]
    assert importing.line(ws_copy, ids=wanted, echo=lambda _: None).n_added == 0  # once each
    assert importing.line(ws_copy, ids=content_id(data[4]), echo=lambda _: None).n_added == 1  # one id, not letters
    assert ws.settings()["imports"][-1]["which"] == "chosen"


def queue_rows(ws: Workspace) -> list[dict]:
    return pq.read_table(rounds.latest_queue(ws)[1]).to_pylist()  # in file order, which must be rank order


def test_enqueue_puts_a_new_line_image_at_rank_1_and_shifts_the_rest(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    before = queue_rows(ws)
    data = log_line(ws, 3, flagged={1}, at=datetime.now(UTC))
    new = content_id(data[1])
    importing.line(scored_copy_path, ids=[new], echo=lambda _: None)
    out = rounds.enqueue(ws, [new])
    assert (out.round_no, out.added, out.moved, out.rewritten) == (0, [new], [], True)
    after = queue_rows(ws)
    assert [r["rank"] for r in after] == list(range(1, len(before) + 2))
    assert after[0] == {"id": new, "t2": 11.0, "p_value": 0.25, "anomaly": True, "rank": 1, "score": 1.0,
                        "t2_local": 21.0}  # the prediction log's answer
    assert [{**r, "rank": r["rank"] - 1} for r in after[1:]] == before  # the others, shifted, scores untouched


def test_enqueue_moves_a_queued_image_up_and_twice_is_once(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    before = queue_rows(ws)
    a, b = before[9]["id"], before[4]["id"]
    out = rounds.enqueue(ws, [a, b])
    assert (out.added, out.moved, out.rewritten) == ([], [a, b], True)
    after = queue_rows(ws)
    assert [r["id"] for r in after] == [a, b] + [r["id"] for r in before if r["id"] not in (a, b)]
    assert [r["rank"] for r in after] == list(range(1, len(before) + 1))
    assert {k: v for k, v in after[0].items() if k != "rank"} == {k: v for k, v in before[9].items() if k != "rank"}
    path = rounds.latest_queue(ws)[1]
    stamp = path.stat().st_mtime_ns
    again = rounds.enqueue(ws, [a, b])
    assert not again.rewritten and queue_rows(ws) == after and path.stat().st_mtime_ns == stamp


def test_enqueue_needs_a_queue_pool_images_and_scores(synthetic_ws, scored_copy_path):
    with pytest.raises(ValueError, match="no labeling queue"):
        rounds.enqueue(Workspace.open(synthetic_ws), ["any"])  # raises before it writes anything
    ws = Workspace.open(scored_copy_path)
    train_id = next(i for i, s in zip(ws.images().column("id").to_pylist(), ws.images().column("split").to_pylist(),
                                      strict=True) if s != "pool")
    with pytest.raises(ValueError, match="not pool images"):
        rounds.enqueue(ws, [train_id])
    data = log_line(ws, 1, flagged={0}, at=datetime.now(UTC))
    importing.line(scored_copy_path, echo=lambda _: None)
    for p in ws.predictions_dir.glob("*.parquet"):
        p.unlink()  # in the pool, not in the queue, and no longer in the log: nothing to rank it by
    with pytest.raises(ValueError, match="neither in the queue nor in the prediction log"):
        rounds.enqueue(ws, [content_id(data[0])])


def fake_round(seen: dict, ws: Workspace):
    """Stands in for rounds.run_round (no training): notes the pool the round would have trained on."""
    def run_round(ws_, spec, **kwargs):
        seen["pool"] = pool_ids(ws)
        return rounds.RoundOutcome(1, None, None, "val", False, "a stand-in", None, {})
    return run_round


def test_round_ingest_adds_the_logged_images_before_the_round(scored_copy_path, monkeypatch, capsys):
    ws = Workspace.open(scored_copy_path)
    before = pool_ids(ws)
    seen: dict = {}
    monkeypatch.setattr(rounds, "run_round", fake_round(seen, ws))
    data = log_line(ws, 4, flagged={1, 2}, at=datetime.now(UTC))
    assert run_cli("round", scored_copy_path) == 0  # without --ingest: the pool stays as it is
    assert seen.pop("pool") == before and "line image" not in capsys.readouterr().out
    assert run_cli("round", scored_copy_path, "--ingest") == 0
    out = capsys.readouterr().out
    assert "2 line image(s)" in out and "2 new" in out and out.index("2 new") < out.index("round 1 in")
    assert seen.pop("pool") - before == {content_id(data[1]), content_id(data[2])}
    assert run_cli("round", scored_copy_path, "--ingest", "all") == 0
    assert seen.pop("pool") - before == {content_id(d) for d in data}


def test_round_ingest_with_nothing_logged_says_so_and_goes_on(scored_copy_path, monkeypatch, capsys):
    ws = Workspace.open(scored_copy_path)
    seen: dict = {}
    monkeypatch.setattr(rounds, "run_round", fake_round(seen, ws))
    assert run_cli("round", scored_copy_path, "--ingest") == 0  # no predictions folder
    ws.predictions_dir.mkdir()
    assert run_cli("round", scored_copy_path, "--ingest", "all") == 0  # a folder without rows
    lines = capsys.readouterr().out.splitlines()
    assert sum("--ingest: nothing logged in" in line for line in lines) == 2 and "pool" in seen
    assert len(ws.settings()["imports"]) == 1  # no empty import recorded
    with pytest.raises(SystemExit) as info:
        run_cli("round", scored_copy_path, "--ingest", "some")
    assert info.value.code == 2 and "invalid choice: 'some'" in capsys.readouterr().err

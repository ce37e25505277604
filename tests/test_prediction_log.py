"""The prediction log keeps every answered row once: buffered off the request path, written atomically, compacted
by the hour without losing or doubling a row, and a kill costs at most the unwritten buffer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from aae_ray import prediction_log as plog
from aae_ray.prediction_log import LogSettings, PredictionLog, compact, content_id, read_predictions


def answers(n: int, flagged_every: int = 3) -> tuple[list[dict], list[bytes]]:
    results = [{"name": f"{i}.png", "score": float(i), "t2": 2.0 * i, "t2_local": None, "p_value": 1 / (i + 1),
                "threshold": 10.0, "anomaly": i % flagged_every == 0} for i in range(n)]
    return results, [f"image {i}".encode() for i in range(n)]


def test_every_recorded_row_is_written_once_with_its_answer(tmp_path):
    log = PredictionLog(tmp_path / "predictions", LogSettings(flush_interval_s=0.05)).start()
    results, images = answers(30)
    for i in range(0, 30, 5):  # six requests of five images
        log.record(results[i:i + 5], images[i:i + 5], round_no=2, model="rounds/r002/model", station="line-1")
    log.close()
    table = read_predictions(tmp_path / "predictions")
    assert table.num_rows == 30 and log.written == 30 and log.pending() == 0
    rows = sorted(table.to_pylist(), key=lambda r: r["score"])
    for r, want, data in zip(rows, results, images, strict=True):
        assert r["id"] == content_id(data) and r["name"] == want["name"] and r["t2"] == want["t2"]
        assert r["round"] == 2 and r["model"] == "rounds/r002/model" and r["station"] == "line-1"
        assert r["anomaly"] == want["anomaly"] and r["t2_local"] is None
        assert (r["image"] == data) if want["anomaly"] else r["image"] is None  # default: flagged images only


def test_the_log_id_is_the_id_a_folder_import_gives_the_same_bytes(tmp_path):
    from aae_ray.data.images import stable_id

    data = b"\x89PNG some bytes"
    import hashlib

    assert content_id(data) == stable_id("folder", hashlib.sha1(data).hexdigest())


@pytest.mark.parametrize(("images", "sample", "kept"), [("all", 0.0, 30), ("none", 1.0, 0), ("flagged", 0.0, 10)])
def test_which_images_keep_their_bytes(tmp_path, images, sample, kept):
    log = PredictionLog(tmp_path, LogSettings(images=images, sample=sample))
    log.record(*answers(30), round_no=0, model="m")
    log.flush()
    assert read_predictions(tmp_path).column("image").drop_null().__len__() == kept


def test_a_sample_of_the_normal_images_keeps_its_bytes(tmp_path):
    log = PredictionLog(tmp_path, LogSettings(images="flagged", sample=0.5), seed=0)
    results, images = answers(1000, flagged_every=10**9)  # only image 0 flagged
    log.record(results, images, round_no=0, model="m")
    log.flush()
    assert 420 < read_predictions(tmp_path).column("image").drop_null().__len__() < 580


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match="flagged, all or none"):
        LogSettings(images="some")
    with pytest.raises(ValueError, match="sample"):
        LogSettings(sample=1.5)


def test_a_failed_write_keeps_the_rows_for_the_next_one(tmp_path):
    blocker = tmp_path / "predictions"
    blocker.write_text("a file where the folder should be")
    log = PredictionLog(blocker)
    log.record(*answers(4), round_no=0, model="m")
    assert log.flush() == 0 and log.pending() == 4  # logged, not raised
    blocker.unlink()
    assert log.flush() == 4 and read_predictions(blocker).num_rows == 4


def test_a_full_buffer_is_written_without_waiting_for_the_interval(tmp_path):
    log = PredictionLog(tmp_path, LogSettings(flush_interval_s=3600, max_rows=10)).start()
    log.record(*answers(12), round_no=0, model="m")
    deadline = time.monotonic() + 5
    while log.written < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.written == 12
    log.close()


def _fragments_in(folder, hours_ago: list[int], now: datetime) -> int:
    n = 0
    for k, h in enumerate(hours_ago):
        results, images = answers(5)
        when = now - timedelta(hours=h)
        rows = [PredictionLog(folder)._row(r, d, when + timedelta(seconds=k), 0, "m", None)
                for r, d in zip(results, images, strict=True)]
        plog.write_fragment(folder, rows, now=when)
        n += len(rows)
    return n


def test_compaction_merges_ended_hours_and_keeps_every_row_once(tmp_path):
    now = datetime(2026, 12, 2, 14, 30, tzinfo=UTC)
    total = _fragments_in(tmp_path, [3, 3, 2, 2, 2, 0, 0], now)
    before = sorted(read_predictions(tmp_path).to_pylist(), key=lambda r: (r["ts"], r["name"]))
    assert compact(tmp_path, now=now) == 25  # the hours 11 and 12; 14 is still open
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert [n for n in names if n.startswith("h-")] == ["h-20261202T11.parquet", "h-20261202T12.parquet"]
    assert sum(n.startswith("f-") for n in names) == 2
    after = sorted(read_predictions(tmp_path).to_pylist(), key=lambda r: (r["ts"], r["name"]))
    assert len(after) == total and after == before
    assert compact(tmp_path, now=now) == 0  # nothing left to merge


def test_a_compaction_killed_before_its_deletions_doubles_nothing(tmp_path, monkeypatch):
    now = datetime(2026, 12, 2, 14, 30, tzinfo=UTC)
    total = _fragments_in(tmp_path, [2, 2], now)
    monkeypatch.setattr(plog.Path, "unlink", lambda self, missing_ok=False: None)  # the kill: no deletion happens
    compact(tmp_path, now=now)
    monkeypatch.undo()
    assert len(list(tmp_path.glob("f-*.parquet"))) == 2  # still there, superseded by the hour file
    assert read_predictions(tmp_path).num_rows == total
    compact(tmp_path, now=now)
    assert not list(tmp_path.glob("f-*.parquet")) and read_predictions(tmp_path).num_rows == total


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "f-20261202T10-000000000000-1-abc.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="unreadable prediction log file .*f-20261202T10"):
        read_predictions(tmp_path)


def test_a_killed_writer_leaves_whole_fragments_and_loses_at_most_one_flush_interval(tmp_path):
    interval = 0.2
    child = textwrap.dedent(f"""
        import sys, time
        from aae_ray.prediction_log import LogSettings, PredictionLog
        log = PredictionLog(sys.argv[1], LogSettings(flush_interval_s={interval})).start()
        i = 0
        while True:
            log.record([{{"name": str(i), "score": float(i), "anomaly": True}}], [str(i).encode() * 50],
                       round_no=0, model="m")
            i += 1
            time.sleep(0.002)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)])
    time.sleep(3.0)
    proc.send_signal(signal.SIGKILL)
    killed_at = datetime.now(UTC)
    proc.wait(timeout=10)
    for p in tmp_path.glob("*.parquet"):  # every visible file is whole
        pq.read_table(p)
    table = read_predictions(tmp_path)
    last = max(table.column("ts").to_pylist())
    scores = sorted(table.column("score").to_pylist())
    assert scores == [float(i) for i in range(len(scores))]  # no row lost before the last one written
    assert killed_at - last < timedelta(seconds=interval + 0.5)  # what was lost: the unwritten buffer


def test_a_running_log_compacts_the_ended_hours_itself(tmp_path):
    total = _fragments_in(tmp_path, [5, 5, 4], datetime.now(UTC))
    log = PredictionLog(tmp_path, LogSettings(flush_interval_s=0.05)).start()
    deadline = time.monotonic() + 10
    while len(list(tmp_path.glob("h-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    assert len(list(tmp_path.glob("h-*.parquet"))) == 2 and not list(tmp_path.glob("f-*.parquet"))
    assert read_predictions(tmp_path).num_rows == total


def test_a_log_started_just_after_boot_compacts_at_once(tmp_path, monkeypatch):
    """The monotonic clock counts from boot: a writer started in a machine's first minutes compacts the ended
    hours at once all the same."""
    booted = time.monotonic() - 1.0  # as if the machine had been up for one second
    monkeypatch.setattr(plog, "time", type("Clock", (), {"monotonic": staticmethod(lambda: time.monotonic() - booted)}))
    _fragments_in(tmp_path, [5, 4], datetime.now(UTC))
    log = PredictionLog(tmp_path, LogSettings(flush_interval_s=0.05)).start()
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("h-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    assert len(list(tmp_path.glob("h-*.parquet"))) == 2


def test_a_slow_disk_does_not_stretch_how_long_a_row_waits_for_the_disk(tmp_path, monkeypatch):
    """Each write is on disk one interval after the previous write took its rows, however long a write takes:
    so no row waits longer than the interval, which is what a kill can lose."""
    writes: list[tuple[float, float]] = []  # (rows taken, on disk)
    real = plog.write_fragment

    def slow(folder, rows, **kw):
        taken = time.monotonic()
        time.sleep(0.12)
        path = real(folder, rows, **kw)
        writes.append((taken, time.monotonic()))
        return path

    monkeypatch.setattr(plog, "write_fragment", slow)
    log = PredictionLog(tmp_path, LogSettings(flush_interval_s=0.3)).start()
    for _ in range(30):
        log.record(*answers(1), round_no=0, model="m")
        time.sleep(0.05)
    log.close()
    waits = [done - taken_before for (taken_before, _), (_, done) in zip(writes, writes[1:], strict=False)][:-1]
    assert len(waits) >= 3 and max(waits) < 0.3 + 0.06  # not 0.3 + 0.12 (+ the write after it)


def test_compaction_deletes_the_temporary_files_of_killed_writers(tmp_path):
    now = datetime(2026, 12, 2, 14, 30, tzinfo=UTC)
    old, fresh = tmp_path / ".f-20261202T13-x.parquet.1.ab.tmp", tmp_path / ".f-20261202T14-y.parquet.1.cd.tmp"
    for p, age in ((old, timedelta(minutes=30)), (fresh, timedelta(seconds=10))):
        p.write_bytes(b"PAR1 half a file")
        t = (now - age).timestamp()
        os.utime(p, (t, t))
    assert read_predictions(tmp_path).num_rows == 0  # readers never see them
    compact(tmp_path, now=now)
    assert not old.exists() and fresh.exists()  # a write under way now is left alone

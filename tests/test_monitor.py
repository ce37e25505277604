"""The line's monitor: the prediction log as a chart per station, drift and rate alarms recorded once."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats
from test_ingest import png

from aae_ray import artifacts, monitor
from aae_ray.prediction_log import LogSettings, PredictionLog, content_id
from aae_ray.workspace import Workspace

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def log_stream(ws: Workspace, z: np.ndarray, *, station: str | None = "cam-1", round_no: int = 0,
               start: datetime = T0, step: timedelta = timedelta(seconds=1),
               over: np.ndarray | None = None, pngs: bool = False) -> list[str]:
    """Served images whose primary scores sit at the normal quantiles `z` of the round's calibration scores: an
    in-control stream for z ~ N(0, 1), a shifted one for z ~ N(d, 1). `over`: these are defects, far over.
    `pngs`: real (noise) PNG images whose bytes the log keeps, else placeholder bytes it does not keep."""
    limit = artifacts.read_limit(ws.model_dir(round_no))
    scores = np.quantile(limit.calibration, stats.norm.cdf(z))
    if over is not None:
        scores[over] = 2 * limit.threshold
    log = PredictionLog(ws.predictions_dir, LogSettings(images="all" if pngs else "none"))
    seed = zlib.crc32(f"{station}{round_no}{start}".encode()) % 10**6
    images = [png(seed + i) if pngs else f"{station}-{round_no}-{start:%H%M%S}-{i}".encode() for i in range(len(z))]
    for i, s in enumerate(scores):
        result = {"score": float(s), "t2": float(s), "t2_local": None, "p_value": float(limit.p_value(s)),
                  "threshold": limit.threshold, "anomaly": bool(s > limit.threshold)}
        log.record([result], [images[i]], round_no=round_no,
                   model=f"rounds/r{round_no:03d}/model", station=station, ts=start + i * step)
    log.flush()
    return [content_id(b) for b in images]


def shifted(n_in: int, n_out: int, shift: float, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal(n_in + n_out)
    z[n_in:] += shift
    return z


def test_a_planted_shift_raises_one_drift_alarm_soon_after_it_starts(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    ids = log_stream(ws, shifted(300, 200, 1.5))
    # ARL0 5000: a false alarm among the 300 in-control images has a chance of 6%, none with this seed
    settings = monitor.MonitorSettings(lam=0.1, arl0=5000)
    new = monitor.check_alarms(ws, settings, now=T0 + timedelta(minutes=10))
    drift = [a for a in new if a["kind"] == "drift"]
    assert len(drift) == 1, "one sustained shift, one excursion, one alarm"
    first = drift[0]
    n_image = ids.index(first["image_id"])
    # this design's ARL at a 1.5-sigma shift is ~8 images; 60 is far in its tail
    assert settings.design().arl(1.5) < 10
    assert 300 <= n_image < 360 and first["direction"] == "up" and first["station"] == "cam-1"
    assert first["statistic"] > first["limit"] == pytest.approx(settings.design().limit)
    assert monitor.check_alarms(ws, settings, now=T0 + timedelta(minutes=10)) == []  # recorded once
    assert [a["id"] for a in monitor.read_alarms(ws)] == [a["id"] for a in sorted(
        new, key=lambda a: (a["ts"], a["id"]), reverse=True)]


def test_two_checkers_writing_the_same_alarm_are_read_once(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(100, 100, 2.0))
    first = monitor.check_alarms(ws, now=T0 + timedelta(minutes=5))
    for path in list(ws.alarms_dir.glob("*.parquet")):  # a second checker that raced the first one
        (ws.alarms_dir / path.name.replace("a-", "a-z", 1)).write_bytes(path.read_bytes())
    assert len(list(ws.alarms_dir.glob("*.parquet"))) == 2
    assert len(monitor.read_alarms(ws)) == len(first) > 0
    summary = monitor.alarm_summary(ws)
    assert summary["count"] == len(first) and "station cam-1 round 0: drift up" in summary["latest"][0]


def test_a_line_that_alarms_often_keeps_few_alarm_files_and_every_alarm(scored_copy_path, monkeypatch):
    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(100, 100, 2.0))
    chart = monitor.line_chart(ws)
    alarm = monitor.drift_alarms(chart)[0]
    recorded = []
    for i in range(3 * monitor.ALARM_FILES_KEPT):  # a check that finds one new alarm, again and again
        recorded += monitor._record(ws, [alarm | {"id": f"{i:016x}", "n": i}], T0 + timedelta(seconds=i))
    assert len(recorded) == 3 * monitor.ALARM_FILES_KEPT
    assert len(list(ws.alarms_dir.glob("a-*.parquet"))) <= monitor.ALARM_FILES_KEPT
    got = monitor.read_alarms(ws)
    assert sorted((a["id"], a["n"]) for a in got) == [(f"{i:016x}", i) for i in range(3 * monitor.ALARM_FILES_KEPT)]
    assert monitor._record(ws, [alarm | {"id": f"{5:016x}"}], T0) == []  # merged, still known
    real, calls = pq.read_table, []

    def merged_meanwhile(path, *a, **k):  # the first read finds a file another writer has just merged away
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(path)
        return real(path, *a, **k)

    monkeypatch.setattr(monitor.pq, "read_table", merged_meanwhile)
    assert len(monitor.read_alarms(ws)) == 3 * monitor.ALARM_FILES_KEPT


def test_stations_are_charted_apart_and_only_the_drifting_one_alarms(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(200, 200, 0.0, seed=3), station="cam-1")
    log_stream(ws, shifted(200, 200, 2.0, seed=4), station="cam-2")
    log_stream(ws, shifted(50, 0, 0.0, seed=5), station=None)
    chart = monitor.line_chart(ws)
    assert set(chart.streams) == {"cam-1", "cam-2", monitor.UNNAMED} and chart.n == 850
    alarms = monitor.drift_alarms(chart)
    assert {a["station"] for a in alarms} == {"cam-2"}


def test_in_control_normal_scores_are_standard_and_the_ewma_restarts_at_a_promotion(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    z = np.random.default_rng(7).standard_normal(400)
    log_stream(ws, z[:200])
    # round 1 is the same model promoted again: a new round number is what restarts the chart
    import shutil
    shutil.copytree(ws.model_dir(0), ws.model_dir(1))
    log_stream(ws, z[200:], round_no=1, start=T0 + timedelta(seconds=200))
    s = monitor.line_chart(ws, monitor.MonitorSettings(lam=0.2)).streams["cam-1"]
    assert abs(s.z.mean()) < 0.2 and 0.8 < s.z.std() < 1.2
    assert s.ewma[200] == pytest.approx(0.2 * s.z[200])  # started again from 0
    assert s.ewma[199] != pytest.approx(0.2 * s.z[199])
    assert np.allclose(s.centre, np.median(artifacts.read_limit(ws.model_dir(0)).calibration))
    chart = monitor.line_chart(ws)
    assert [(p[1], p[2]) for p in chart.promotions] == [("cam-1", 0), ("cam-1", 1)]
    from aae_ray import monitor_report

    drawn = monitor_report.ewma_figure(monitor_report.view(ws, chart=chart)).axes[0].texts
    assert [t.get_text() for t in drawn] == ["r0", "r1"]  # each promotion marked on the chart
    window = s.between(T0 + timedelta(seconds=100), T0 + timedelta(seconds=149))
    assert len(window) == 50 and window.ewma[0] == s.ewma[100]


def test_an_ended_hour_with_too_many_images_over_the_limit_raises_a_rate_alarm(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    z = np.random.default_rng(1).standard_normal(120)
    defects = np.arange(120) % 4 == 0  # a quarter far above the limit: a defect rate, not a drift of the normals
    log_stream(ws, z, step=timedelta(seconds=20), over=defects)  # 08:00 to 08:40
    during = monitor.check_alarms(ws, now=T0 + timedelta(minutes=50))
    assert not [a for a in during if a["kind"] == "rate"], "the hour has not ended"
    after = monitor.check_alarms(ws, now=T0 + timedelta(hours=1, minutes=1))
    rate = [a for a in after if a["kind"] == "rate"]
    assert len(rate) == 1 and rate[0]["n"] == 120 and rate[0]["statistic"] >= 30
    hours = list(monitor.hourly_rates(monitor.line_chart(ws)))
    assert len(hours) == 1 and hours[0][3].outside


def test_no_log_means_no_streams_and_no_alarms(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    assert monitor.line_chart(ws).streams == {}
    assert monitor.check_alarms(ws) == [] and monitor.alarm_summary(ws) == {"count": 0, "latest": []}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="EWMA weight"):
        monitor.MonitorSettings(lam=0)
    with pytest.raises(ValueError, match="in-control ARL"):
        monitor.MonitorSettings(arl0=3)


def test_status_shows_the_line_and_its_alarms(scored_copy_path, capsys):
    from conftest import run_cli

    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(50, 100, 2.5), station="cam-4")
    monitor.check_alarms(ws, now=T0 + timedelta(minutes=5))
    capsys.readouterr()
    assert run_cli("status", scored_copy_path) == 0
    out = capsys.readouterr().out
    assert "line: 150 served images" in out and "stations cam-4" in out
    assert "alarms: 1 " in out and "station cam-4 round 0: drift up" in out


def test_the_report_writes_the_charts_and_their_numbers(scored_copy_path, tmp_path):
    import json

    from PIL import Image

    from aae_ray.monitor_report import write_report

    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(100, 100, 2.0), station="cam-1")
    log_stream(ws, shifted(80, 0, 0.0, seed=2), station="cam-2", start=T0 + timedelta(hours=2))
    data = write_report(ws, tmp_path / "report", stations=["cam-1"])
    for name in ("score", "ewma", "rate"):
        assert Image.open(tmp_path / "report" / f"{name}.png").size[0] > 500
    saved = json.loads((tmp_path / "report" / "monitor.json").read_text())
    assert saved["images"] == 200 and list(saved["stations"]) == ["cam-1"] and saved["new_alarms"] >= 1
    assert saved["alarms"][0]["kind"] == "drift" and "cam-1" in saved["alarms"][0]["text"]
    assert saved["design"]["arl0"] == 500 and saved["design"]["arl_at_1_sigma"] < 15
    assert sum(h["n"] for h in saved["hours"]) == 200 == data["images"]
    window = write_report(ws, tmp_path / "later", since=T0 + timedelta(hours=1))
    assert window["images"] == 80 and window["alarms"] == [] and window["new_alarms"] == 0


def test_a_long_window_is_drawn_thinned_without_losing_an_excursion_or_a_flagged_image():
    from aae_ray import monitor_report as mr

    rng = np.random.default_rng(0)
    y = np.cumsum(rng.standard_normal(200_000)) * 0.01
    y[123_457] = 50.0  # one image's spike, far above everything
    at = mr.envelope(y, 1000)
    assert len(at) <= 1000 and np.all(np.diff(at) > 0)
    assert 123_457 in at and y[at].max() == y.max() and y[at].min() == y.min()
    assert list(mr.envelope(y[:500], 1000)) == list(range(500))  # short: every point
    anomaly = np.zeros(200_000, bool)
    anomaly[rng.choice(200_000, 300, replace=False)] = True
    over, other = mr.shown(anomaly, 4000)  # few over the limit: every one of them
    assert set(over) == set(np.flatnonzero(anomaly)) and len(over) + len(other) <= 4000
    assert not anomaly[other].any() and other[0] == 0 and other[-1] == 199_999
    anomaly[::20] = True  # many: evenly spaced, each kind in its share
    over, other = mr.shown(anomaly, 4000)
    assert len(over) + len(other) == 4000 and abs(len(over) / 4000 - anomaly.mean()) < 0.01
    line = np.r_[np.full(1000, 2.0), np.full(1000, 3.0)]
    assert list(mr._steps(line)) == [0, 1000, 1999]


def test_the_monitor_command_writes_a_report(scored_copy_path, tmp_path, capsys):
    from conftest import run_cli

    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(60, 60, 2.5), station="cam-1")
    capsys.readouterr()
    assert run_cli("monitor", scored_copy_path, "--report", tmp_path / "r", "--station", "cam-1",
                   "--arl0", "1000") == 0
    out = capsys.readouterr().out
    assert "120 served images, 1 alarm(s) in the window (1 new)" in out and "drift up" in out
    assert (tmp_path / "r" / "ewma.png").exists()
    assert run_cli("monitor", scored_copy_path, "--report", tmp_path / "r", "--lam", "0") == 2
    assert "EWMA weight" in capsys.readouterr().err


def test_send_to_labeling_puts_a_logged_image_first_in_the_queue(scored_copy_path):
    ws = Workspace.open(scored_copy_path)
    ids = log_stream(ws, shifted(5, 0, 0.0), pngs=True)
    text = monitor.send_to_labeling(ws, ids[3])
    assert "first in round 0's labeling queue (added)" in text
    queue = sorted(pq.read_table(ws.round_dir(0) / "scores.parquet").to_pylist(), key=lambda r: r["rank"])
    assert queue[0]["id"] == ids[3] and len({r["id"] for r in queue}) == len(queue)
    assert "already first" in monitor.send_to_labeling(ws, ids[3])
    assert monitor.logged_image(ws, ids[3]) == png(zlib.crc32(f"cam-10{T0}".encode()) % 10**6 + 3)
    placeholder = log_stream(ws, shifted(1, 0, 0.0), start=T0 + timedelta(hours=1))
    with pytest.raises(ValueError, match="cannot join the pool"):
        monitor.send_to_labeling(ws, placeholder[0])


def test_replicas_check_at_most_once_an_interval_and_only_when_the_log_grew(scored_copy_path, monkeypatch):
    import os

    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(50, 100, 2.5), station="cam-1")
    checks = []
    real = monitor.check_new_alarms
    monkeypatch.setattr(monitor, "check_new_alarms", lambda *a, **k: checks.append(1) or real(*a, **k))
    assert monitor.check_alarms_if_due(ws, 30) and len(checks) == 1
    assert monitor.check_alarms_if_due(ws, 30) == [] and len(checks) == 1  # a second replica, same interval
    stamp = ws.alarms_dir / monitor.CHECKED
    os.utime(stamp, (stamp.stat().st_mtime - 60,) * 2)
    monitor.check_alarms_if_due(ws, 30)
    assert len(checks) == 1  # due, but nothing new in the log
    log_stream(ws, shifted(20, 0, 0.0), station="cam-2", start=T0 + timedelta(hours=1))
    monitor.check_alarms_if_due(ws, 30)
    assert len(checks) == 2


def test_checks_that_go_on_from_the_last_raise_the_whole_logs_alarms(scored_copy_path, monkeypatch):
    """A replica's check every few minutes, each reading only the rows since the hour the last one folded in,
    records what one check of the whole log would: the same drift and rate alarms, ids and all, through a
    promotion and a drift that runs across a fold (its alarm once, not again when the chart goes on)."""
    import shutil

    from aae_ray import prediction_log as plog

    real = plog.write_fragment  # fragments named by their rows' hour, as on a line that logs as it serves
    monkeypatch.setattr(plog, "write_fragment", lambda folder, rows, now=None: real(
        folder, rows, now=max(r["ts"] for r in rows)))
    ws = Workspace.open(scored_copy_path)
    shutil.copytree(ws.model_dir(0), ws.model_dir(1))
    rng = np.random.default_rng(11)
    step, chunk = timedelta(seconds=6), 100  # 10 minutes of images a station per chunk
    settings = monitor.MonitorSettings(lam=0.1, arl0=5000)
    for c in range(24):  # 08:00 to 12:00
        start = T0 + c * chunk * step
        z = rng.standard_normal(chunk)
        if 5 <= c <= 8:  # cam-1 drifts from 08:50 to 09:30, across the fold at 09:00
            z += 1.5
        log_stream(ws, z, station="cam-1", start=start, step=step)
        over = (np.arange(chunk) % 5 == 0) if 18 <= c <= 20 else None  # cam-2: a defect rate from 11:00
        log_stream(ws, rng.standard_normal(chunk) - (2.0 if c in (14, 15) else 0.0), station="cam-2",
                   round_no=1 if c >= 12 else 0, start=start + step / 2, step=step, over=over)
        monitor.check_new_alarms(ws, settings, now=start + chunk * step + timedelta(seconds=30))
    end = T0 + timedelta(hours=4, minutes=10)
    monitor.check_new_alarms(ws, settings, now=end)
    chart = monitor.line_chart(ws, settings)
    whole = monitor.drift_alarms(chart) + monitor.rate_alarms(chart, settings.band_level, end)
    kinds = sorted((a["kind"], a["station"], a["direction"]) for a in whole)
    assert ("drift", "cam-1", "up") in kinds and ("drift", "cam-2", "down") in kinds and ("rate", "cam-2", "up") \
        in kinds
    assert kinds.count(("drift", "cam-1", "up")) == 1, "one excursion, one alarm, across the fold"
    keys = ["id", "kind", "station", "round", "ts", "image_id", "n"]
    recorded = [{k: a[k] for k in keys} for a in monitor.read_alarms(ws)]
    assert sorted(recorded, key=str) == sorted(({k: a[k] for k in keys} for a in whole), key=str)
    for a in monitor.read_alarms(ws):
        w = next(b for b in whole if b["id"] == a["id"])
        assert a["statistic"] == pytest.approx(w["statistic"], rel=1e-9)
    # The page's windows start from those checkpoints, with the EWMA the whole log gives their images.
    for since in (T0 + timedelta(minutes=m) for m in (65, 120, 150, 200)):
        part = monitor.window_chart(ws, settings, since)
        assert sum(len(s) for s in part.streams.values()) < chart.n, "the log before the window is not read"
        for station, s in chart.streams.items():
            want, got = s.between(since, None), part.streams[station].between(since, None)
            assert got.ids == want.ids and len(got) > 0
            np.testing.assert_allclose(got.ewma, want.ewma, rtol=1e-9, atol=1e-12)
        first = max(t for t, _ in monitor.read_checkpoints(ws, settings) if t <= since)  # where it starts
        assert part.promotions == [p for p in chart.promotions if p[0] >= first]  # none made up at its start


def test_a_check_that_goes_on_reads_only_the_recent_hours(scored_copy_path, monkeypatch):
    from aae_ray import prediction_log as plog

    real = plog.write_fragment
    monkeypatch.setattr(plog, "write_fragment", lambda folder, rows, now=None: real(
        folder, rows, now=max(r["ts"] for r in rows)))
    ws = Workspace.open(scored_copy_path)
    for h in range(3):  # 08:00 to 10:50, a fragment an hour
        log_stream(ws, shifted(100, 0, 0.0, seed=h), start=T0 + timedelta(hours=h), step=timedelta(seconds=30))
    monitor.check_new_alarms(ws, now=T0 + timedelta(hours=3))  # folds in up to 10:00
    old = sorted(ws.predictions_dir.glob("f-20261201T08-*.parquet"))
    assert old
    old[0].write_bytes(b"not parquet")  # a file it has no reason to open
    assert monitor.check_new_alarms(ws, now=T0 + timedelta(hours=3, minutes=5)) == []
    with pytest.raises(ValueError, match="unreadable prediction log file"):
        monitor.check_alarms(ws)
    with pytest.raises(ValueError, match="unreadable prediction log file"):  # other settings: the whole log
        monitor.check_new_alarms(ws, monitor.MonitorSettings(lam=0.2), now=T0 + timedelta(hours=3, minutes=10))
    monitor._state_path(ws, monitor.MonitorSettings()).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable prediction log file"):  # no state: the whole log
        monitor.check_new_alarms(ws, now=T0 + timedelta(hours=3, minutes=15))


def test_the_centre_line_is_the_in_control_median_of_the_score():
    from aae_ray.scoring import ScoreLimit, f_p_value

    calibrated = ScoreLimit(0.01, 9.0, np.array([1.0, 2.0, 3.0, 4.0, 100.0]), "calibrated")
    assert monitor.centre_line(calibrated) == 3.0
    f_law = ScoreLimit(0.01, 30.0, np.empty(0), "f_ucl", f_dof=(200, 8))
    assert f_p_value(np.array([monitor.centre_line(f_law)]), 200, 8)[0] == pytest.approx(0.5)
    assert np.isnan(monitor.centre_line(None))

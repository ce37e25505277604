"""The line's monitor: the prediction log (WS/predictions/) read as control charts, drift alarms kept in WS/alarms/.

A *stream* is one station's served images in arrival order (rows without a station form the stream "unnamed";
stations are different processes, so each has its own chart). Each image is charted against the model that
answered it: its primary score beside that model's centre line (the median normal score) and limit, and its
normal score (aae_ray.control_chart.normal_scores: N(0, 1) while in control, from the model's calibration
scores) in an EWMA chart designed for an in-control average run length of `arl0` images. The EWMA starts again
at 0 when a station's answering round changes (a promotion brings a new limit).

Alarms are events, one per excursion of the EWMA outside its limits ("drift", up or down), plus one per ended
hour whose count of images over the limit is above the binomial band of alpha ("rate"). `check_alarms` computes
them from the whole log and appends the new ones to WS/alarms/ (Parquet fragments, atomic); an alarm's id is a
hash of what raised it, so two checkers (a replica and the monitor page) may both write one and a reader still
sees it once. It runs where the whole log is charted anyway: the monitor page over "everything" and
`aae-ray monitor --report` without --since. Serving replicas (every `alarm_check_s`) and the page's shorter
windows run `check_new_alarms` instead: the same alarms from the rows since the last check's hour, going on
from each station's chart there (WS/alarms/.chart_state-*.json), so its cost does not grow with the log; those
hourly checkpoints also let the page chart a window without reading the log before it (`window_chart`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aae_ray import artifacts, control_chart
from aae_ray.atomic import atomic_write, fsync_dir
from aae_ray.prediction_log import COMPACT_MARGIN, UNNAMED_STATION, read_predictions
from aae_ray.scoring import ScoreLimit, f_ucl
from aae_ray.workspace import Workspace

UNNAMED = UNNAMED_STATION
ALARM_SCHEMA = pa.schema([
    ("id", pa.string()), ("kind", pa.string()), ("direction", pa.string()), ("station", pa.string()),
    ("round", pa.int32()), ("model", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("image_id", pa.string()),
    ("statistic", pa.float64()), ("limit", pa.float64()), ("n", pa.int64()), ("detail", pa.string()),
    ("detected_at", pa.timestamp("us", tz="UTC")),
])
LOG_COLUMNS = ["ts", "id", "station", "round", "model", "score", "p_value", "threshold", "anomaly"]


@dataclass(frozen=True)
class MonitorSettings:
    """The charts' design: EWMA weight, in-control ARL, and the confidence of the hourly rate band."""

    lam: float = 0.1
    arl0: float = 500.0
    band_level: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 < self.lam <= 1.0:
            raise ValueError(f"the EWMA weight must be in (0, 1], got {self.lam}")
        if self.arl0 < 10:
            raise ValueError(f"the in-control ARL must be >= 10 images, got {self.arl0}")
        if not 0.5 <= self.band_level < 1.0:
            raise ValueError(f"the rate band's level must be in [0.5, 1), got {self.band_level}")

    def design(self) -> control_chart.EwmaDesign:
        return _design(self.lam, self.arl0)


@lru_cache(maxsize=16)
def _design(lam: float, arl0: float) -> control_chart.EwmaDesign:  # a root search: once a design, not a page load
    return control_chart.design_ewma(lam, arl0)


@dataclass(frozen=True)
class StreamStart:
    """Where a station's chart stood before a stream's first image: the round answering then, the EWMA, how many
    images that round had answered, and whether the chart was armed (see control_chart.excursions). The default
    is a station's first image ever."""

    round: int = -1
    ewma: float = 0.0
    n: int = 0
    armed: bool = True


@dataclass(frozen=True)
class Stream:
    """One station's served images in arrival order, each against the model that answered it."""

    station: str
    ts: np.ndarray  # datetime64[us], UTC
    ids: list[str]
    round: np.ndarray  # int
    score: np.ndarray  # the primary score
    threshold: np.ndarray  # the answering model's limit
    centre: np.ndarray  # the answering model's median normal score
    alpha: np.ndarray  # the answering model's alpha
    anomaly: np.ndarray  # bool
    z: np.ndarray  # normal scores: N(0, 1) while in control
    ewma: np.ndarray  # the EWMA of z, restarted at each change of round
    start: StreamStart = StreamStart()  # the chart before the first image (a check that goes on from the last)

    def __len__(self) -> int:
        return len(self.ids)

    def between(self, since: datetime | None, until: datetime | None) -> Stream:
        keep = np.ones(len(self), dtype=bool)
        if since is not None:
            keep &= self.ts >= np.datetime64(since.astimezone(UTC).replace(tzinfo=None), "us")
        if until is not None:
            keep &= self.ts <= np.datetime64(until.astimezone(UTC).replace(tzinfo=None), "us")
        idx = np.flatnonzero(keep)
        return replace(self, ids=[self.ids[i] for i in idx], **{
            k: getattr(self, k)[idx] for k in ("ts", "round", "score", "threshold", "centre", "alpha", "anomaly",
                                                "z", "ewma")})


@dataclass(frozen=True)
class LineChart:
    design: control_chart.EwmaDesign
    streams: dict[str, Stream]
    promotions: list[tuple[datetime, str, int]] = field(default_factory=list)  # (first answer, station, round)

    @property
    def n(self) -> int:
        return sum(len(s) for s in self.streams.values())


def read_line(ws: Workspace, since: datetime | None = None) -> pa.Table:
    """The prediction log without the image bytes, in arrival order (ties by id, so every read agrees); `since`:
    the rows from then on."""
    table = read_predictions(ws.predictions_dir, columns=LOG_COLUMNS, since=since)
    table = table.set_column(table.schema.get_field_index("station"), "station",
                             pc.fill_null(table.column("station"), UNNAMED))
    return table.sort_by([("ts", "ascending"), ("id", "ascending")])


def line_chart(ws: Workspace, settings: MonitorSettings | None = None, *, since: datetime | None = None,
               starts: dict[str, StreamStart] | None = None) -> LineChart:
    """Every station's stream from the whole log (filter with `Stream.between` for display: the EWMA is the
    same whatever window a person looks at). `since` and `starts`: the streams from then on only, each going on
    from where its station's chart stood then (what `check_new_alarms` keeps between checks)."""
    settings = settings or MonitorSettings()
    design = settings.design()
    table = read_line(ws, since)
    starts = starts or {}
    streams, promotions = {}, []
    for station in sorted(set(table.column("station").to_pylist())):
        rows = table.filter(pc.equal(table.column("station"), station))
        streams[station] = _stream(ws, station, rows, design.lam, starts.get(station, StreamStart()))
        rnd = streams[station].round
        first = rnd[0] != streams[station].start.round if len(rnd) else False  # not where a round goes on
        for i in np.flatnonzero(np.r_[first, rnd[1:] != rnd[:-1]]) if len(rnd) else []:
            promotions.append((to_datetime(streams[station].ts[i]), station, int(rnd[i])))
    return LineChart(design, streams, sorted(promotions))


def _stream(ws: Workspace, station: str, rows: pa.Table, lam: float, start: StreamStart) -> Stream:
    col = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in ("score", "p_value", "threshold", "round")}
    rnd = col["round"].astype(np.int64)
    n = len(rnd)
    z, centre, alpha, stat = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    starts = np.flatnonzero(np.r_[True, rnd[1:] != rnd[:-1]]) if n else np.array([], dtype=int)
    for a, b in zip(starts, np.r_[starts[1:], n], strict=True):
        limit = _limit(ws, int(rnd[a]))
        z[a:b] = _normal(limit, col["score"][a:b], col["p_value"][a:b])
        centre[a:b], alpha[a:b] = centre_line(limit), np.nan if limit is None else limit.alpha
        goes_on = a == 0 and rnd[0] == start.round  # the round answering before the first row: its EWMA goes on
        stat[a:b] = control_chart.ewma(z[a:b], lam, start.ewma if goes_on else 0.0)
    ts = rows.column("ts").to_numpy(zero_copy_only=False).astype("datetime64[us]")
    return Stream(station, ts, rows.column("id").to_pylist(), rnd, col["score"], col["threshold"], centre, alpha,
                  rows.column("anomaly").to_numpy(zero_copy_only=False).astype(bool), z, stat, start)


def _limit(ws: Workspace, round_no: int) -> ScoreLimit | None:
    try:
        return artifacts.read_limit(ws.model_dir(round_no))
    except artifacts.ArtifactError:  # the round's model was deleted: chart its p-values as an F law's
        return None


def _normal(limit: ScoreLimit | None, score: np.ndarray, p_value: np.ndarray) -> np.ndarray:
    if limit is not None and len(limit.calibration):
        return control_chart.normal_scores(score, limit.calibration)
    return control_chart.f_normal_scores(p_value)


def centre_line(limit: ScoreLimit | None) -> float:
    """The in-control median of the score: of the calibration scores, or of the F law of the global T2."""
    if limit is None:
        return float("nan")
    if len(limit.calibration):
        return float(np.median(limit.calibration))
    if limit.f_dof is not None:
        return f_ucl(*limit.f_dof, alpha=0.5)  # the F law's median: its limit at alpha 1/2
    return float("nan")


def to_datetime(t: np.datetime64) -> datetime:
    """A numpy UTC timestamp as an aware datetime."""
    return datetime.fromtimestamp(t.astype("datetime64[us]").astype(np.int64) / 1e6, UTC)


# --- alarms ---------------------------------------------------------------------------------------------------


def drift_alarms(chart: LineChart) -> list[dict[str, Any]]:
    """One alarm an excursion of a station's EWMA outside its limits."""
    limit = chart.design.limit
    out = []
    for s in chart.streams.values():
        for i in control_chart.excursions(s.ewma, limit, armed=s.start.armed):
            since_start = _images_of_round(s, int(i))
            out.append(_alarm("drift", "up" if s.ewma[i] > 0 else "down", s, int(i), float(s.ewma[i]), limit,
                              n=since_start, detail=f"EWMA lam={chart.design.lam:g} L={chart.design.L:.3f} "
                                                    f"(in-control ARL {chart.design.arl0:g} images)"))
    return out


def _images_of_round(s: Stream, i: int) -> int:
    """How many images the round answering image i had answered up to it, i included, since it began answering."""
    other = np.flatnonzero(s.round[: i + 1] != s.round[i])  # earlier rounds' images
    n = i - (int(other[-1]) + 1 if len(other) else 0) + 1
    return n + s.start.n if not len(other) and s.round[i] == s.start.round else n


def rate_alarms(chart: LineChart, level: float, now: datetime) -> list[dict[str, Any]]:
    """One alarm an ended hour of a station with more images over the limit than alpha allows at `level`."""
    out = []
    for hour, s, idx, band in hourly_rates(chart, level):
        if hour + timedelta(hours=1) <= now and band.over > band.high:
            out.append(_alarm("rate", "up", s, int(idx[-1]), float(band.over), float(band.high), n=band.n,
                              detail=f"{band.over} of {band.n} over the limit in the hour from {hour:%Y-%m-%d %H:00} "
                                     f"UTC; alpha allows {band.low}..{band.high} ({level:.0%})"))
    return out


def hourly_rates(chart: LineChart, level: float = 0.99):
    """(hour start, stream, row indices, RateBand) for every station-hour with images."""
    for s in chart.streams.values():
        hours = s.ts.astype("datetime64[h]")
        for h in np.unique(hours):
            idx = np.flatnonzero(hours == h)
            alpha = float(np.nanmean(s.alpha[idx])) if np.isfinite(s.alpha[idx]).any() else 0.01
            yield to_datetime(h), s, idx, control_chart.rate_band(len(idx), int(s.anomaly[idx].sum()), alpha, level)


def _alarm(kind: str, direction: str, s: Stream, i: int, statistic: float, limit: float, *, n: int,
           detail: str) -> dict[str, Any]:
    ts = to_datetime(s.ts[i])
    key = f"{kind}|{direction}|{s.station}|{int(s.round[i])}|{s.ids[i]}|{ts.isoformat()}"
    return {"id": hashlib.sha1(key.encode()).hexdigest()[:16], "kind": kind, "direction": direction,
            "station": s.station, "round": int(s.round[i]), "model": f"rounds/r{int(s.round[i]):03d}/model", "ts": ts,
            "image_id": s.ids[i], "statistic": statistic, "limit": limit, "n": n, "detail": detail}


def check_alarms(ws: Workspace, settings: MonitorSettings | None = None, *, now: datetime | None = None,
                 chart: LineChart | None = None) -> list[dict[str, Any]]:
    """Compute the alarms of the whole log and append the ones not yet recorded to WS/alarms/; the new ones.
    `chart`: the log's chart for these settings, where the caller has it already (it reads the whole log)."""
    settings = settings or MonitorSettings()
    now = now or datetime.now(UTC)
    chart = chart or line_chart(ws, settings)
    return _record(ws, drift_alarms(chart) + rate_alarms(chart, settings.band_level, now), now)


def _record(ws: Workspace, alarms: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Append the alarms not yet recorded to WS/alarms/; those."""
    known = {a["id"] for a in read_alarms(ws)}
    new = [a for a in alarms if a["id"] not in known]
    if new:
        table = pa.Table.from_pylist([a | {"detected_at": now} for a in new], schema=ALARM_SCHEMA)
        ws.alarms_dir.mkdir(parents=True, exist_ok=True)
        path = ws.alarms_dir / f"a-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(path, lambda f: pq.write_table(table, f))
        merge_alarm_files(ws)
    return new


ALARM_FILES_KEPT = 32  # a writer that leaves more alarm files than this merges them into one


def merge_alarm_files(ws: Workspace, keep: int = ALARM_FILES_KEPT) -> int:
    """Merge WS/alarms/'s files into one (each id once) where there are more than `keep`; the files merged. A
    check that finds alarms writes a file, so a line that alarms often would leave thousands, and every read
    (each check, GET /health, `aae-ray status`) opens them all: about a millisecond a file. Safe beside readers
    (the merged file is in place before its sources go, and `read_alarms` lists again when a file vanishes) and
    beside another merger (both merge the same alarms, which are read once)."""
    files = _alarm_files(ws)
    if len(files) <= keep:
        return 0
    try:
        rows = _first_of_each_id(files)
    except FileNotFoundError:  # another writer is merging them
        return 0
    table = pa.Table.from_pylist(rows, schema=ALARM_SCHEMA)
    # Named from the first file's stamp, so it sorts before every file written after those it merges.
    stamp = files[0].name.split("-")[1]
    atomic_write(ws.alarms_dir / f"a-{stamp}-m{uuid.uuid4().hex[:8]}.parquet", lambda f: pq.write_table(table, f))
    for p in files:
        p.unlink(missing_ok=True)
    fsync_dir(ws.alarms_dir)
    return len(files)


CHART_STATE = ".chart_state"  # in WS/alarms/, a file a design: each station's chart at the hours checks folded in
CHECKPOINTS_KEPT = 8 * 24  # hourly: the page's longest window (7 days) can start from one


def check_new_alarms(ws: Workspace, settings: MonitorSettings | None = None, *,
                     now: datetime | None = None) -> list[dict[str, Any]]:
    """`check_alarms` without reading the whole log: it reads the rows since the hour the last check folded in
    and goes on from each station's chart there (WS/alarms/.chart_state-*.json), so a check costs what the last
    hour or so holds, however long the line has run. Its alarms are the whole log's (same ids), except for rows
    that reach the log over COMPACT_MARGIN late, or a log whose early files were deleted: a check of the whole
    log (the monitor page over "everything", `aae-ray monitor --report` without --since) still raises those."""
    settings = settings or MonitorSettings()
    now = now or datetime.now(UTC)
    checkpoints = read_checkpoints(ws, settings)
    through, starts = checkpoints[-1] if checkpoints else (None, {})
    chart = line_chart(ws, settings, since=through, starts=starts)
    new = _record(ws, drift_alarms(chart) + rate_alarms(chart, settings.band_level, now), now)
    # The hours ended COMPACT_MARGIN ago are folded in: no row of theirs is still on its way to the log.
    fold = (now - COMPACT_MARGIN).replace(minute=0, second=0, microsecond=0)
    if through is None or fold > through:
        checkpoints.append((fold, starts | _starts_before(chart, fold)))
        _write_checkpoints(ws, settings, checkpoints[-CHECKPOINTS_KEPT:])
    return new


def window_chart(ws: Workspace, settings: MonitorSettings | None = None,
                 since: datetime | None = None) -> LineChart:
    """The chart of the images from `since` on, with the EWMA the whole log gives them, read from the latest
    checkpoint of `check_new_alarms` at or before `since` rather than from the first row (the whole log where
    there is none, or `since` is None). Cut it to the window with `Stream.between`."""
    settings = settings or MonitorSettings()
    if since is not None:
        before = [(t, starts) for t, starts in read_checkpoints(ws, settings) if t <= since]
        if before:
            return line_chart(ws, settings, since=before[-1][0], starts=before[-1][1])
    return line_chart(ws, settings)


def _starts_before(chart: LineChart, until: datetime) -> dict[str, StreamStart]:
    """Each stream's chart after its last image before `until` (the streams with one)."""
    limit, out = chart.design.limit, {}
    cut = np.datetime64(until.astimezone(UTC).replace(tzinfo=None), "us")
    for station, s in chart.streams.items():
        k = int(np.searchsorted(s.ts, cut, side="left")) - 1  # ts are sorted: the last image before `until`
        if k >= 0:
            out[station] = StreamStart(int(s.round[k]), float(s.ewma[k]), _images_of_round(s, k),
                                       control_chart.armed_after(s.ewma[: k + 1], limit, armed=s.start.armed))
    return out


def check_window(ws: Workspace, settings: MonitorSettings, chart: LineChart,
                 since: datetime | None) -> list[dict[str, Any]]:
    """The check a page or report that holds `window_chart(ws, settings, since)` makes: of that chart where it
    is the whole log (it catches what came late, too), else one that goes on from the last."""
    return check_alarms(ws, settings, chart=chart) if since is None else check_new_alarms(ws, settings)


Checkpoint = tuple[datetime, dict[str, StreamStart]]  # each station's chart before the images from then on


def _state_path(ws: Workspace, settings: MonitorSettings) -> Path:
    # A file a design: the page started with --lam/--arl0 and the replicas (the default) keep their own.
    return ws.alarms_dir / f"{CHART_STATE}-{settings.lam:g}-{settings.arl0:g}.json"


def read_checkpoints(ws: Workspace, settings: MonitorSettings) -> list[Checkpoint]:
    """The checks' checkpoints for this design, oldest first; none where there are none or the file is unreadable
    (a check then reads the whole log)."""
    try:
        state = json.loads(_state_path(ws, settings).read_text())
        if state["settings"] != [settings.lam, settings.arl0]:
            return []
        return [(datetime.fromisoformat(t), {k: StreamStart(**v) for k, v in starts.items()})
                for t, starts in state["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write_checkpoints(ws: Workspace, settings: MonitorSettings, checkpoints: list[Checkpoint]) -> None:
    state = {"settings": [settings.lam, settings.arl0],
             "checkpoints": [[t.isoformat(), {k: asdict(v) for k, v in sorted(starts.items())}]
                             for t, starts in checkpoints]}
    atomic_write(_state_path(ws, settings), lambda f: f.write(json.dumps(state).encode()))


CHECKED = ".checked"  # in WS/alarms/: when the log was last checked, and what it held then


def check_alarms_if_due(ws: Workspace, every_s: float, settings: MonitorSettings | None = None) -> list[dict]:
    """`check_new_alarms`, at most once every `every_s` for the whole workspace (however many replicas ask) and
    only when the log has new files since the last check: N replicas checking on their own would cost N times."""
    stamp = ws.alarms_dir / CHECKED
    listing = sorted((p.name, p.stat().st_size) for p in ws.predictions_dir.glob("*.parquet")) \
        if ws.predictions_dir.is_dir() else []
    signature = hashlib.sha1(repr(listing).encode()).hexdigest()
    try:
        due = datetime.now(UTC).timestamp() - stamp.stat().st_mtime >= every_s and stamp.read_text() != signature
    except FileNotFoundError:
        due = True
    if not due:
        return []
    ws.alarms_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(signature)  # first, so another replica asking meanwhile waits for the next interval
    return check_new_alarms(ws, settings)


def read_alarms(ws: Workspace) -> list[dict[str, Any]]:
    """Every recorded alarm once (the first record of an id), newest first."""
    for _ in range(10):
        try:
            rows = _first_of_each_id(_alarm_files(ws))
        except FileNotFoundError:  # merged while we read: list again
            continue
        return sorted(rows, key=lambda a: (a["ts"], a["id"]), reverse=True)
    raise OSError(f"{ws.alarms_dir}: alarm files kept vanishing while reading")


def _alarm_files(ws: Workspace) -> list[Path]:
    return sorted(ws.alarms_dir.glob("a-*.parquet")) if ws.alarms_dir.is_dir() else []


def _first_of_each_id(files: list[Path]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for path in files:
        for row in pq.read_table(path).to_pylist():
            seen.setdefault(row["id"], row)
    return list(seen.values())


def alarm_summary(ws: Workspace, latest: int = 3) -> dict[str, Any]:
    """What GET /health and `aae-ray status` show: how many alarms, and the latest few in words."""
    alarms = read_alarms(ws)
    return {"count": len(alarms), "latest": [describe_alarm(a) for a in alarms[:latest]]}


def describe_alarm(a: dict[str, Any]) -> str:
    what = {"drift": f"drift {a['direction']} (EWMA {a['statistic']:+.3f} beyond {a['limit']:.3f})",
            "rate": f"too many over the limit ({a['statistic']:.0f} > {a['limit']:.0f} in an hour)"}[a["kind"]]
    return f"{a['ts']:%Y-%m-%d %H:%M:%S} UTC station {a['station']} round {a['round']}: {what}, image {a['image_id']}"


def has_log(ws: Workspace) -> bool:
    """Whether anything was ever served into the log."""
    return ws.predictions_dir.is_dir() and any(ws.predictions_dir.glob("*.parquet"))


def logged_image(ws: Workspace, image_id: str, at: datetime | None = None) -> bytes | None:
    """The bytes the log kept for an image (None where it kept none: `serve --log-images`, `--log-sample`).
    `at`: when it was logged (an alarm's `ts`), so that only the log from then on is read."""
    t = read_predictions(ws.predictions_dir, columns=["id", "image"], since=at)
    t = t.filter(pc.and_(pc.equal(t.column("id"), image_id), pc.is_valid(t.column("image"))))
    return t.column("image")[0].as_py() if t.num_rows else None


def send_to_labeling(ws: Workspace, image_id: str, at: datetime | None = None) -> str:
    """A logged line image into the pool (aae_ray.importing.line) and at the top of the latest labeling queue
    (aae_ray.rounds.enqueue), so the labeling page shows it next; what was done, in words. ValueError where the
    log kept no bytes for it or there is no queue yet. `at`: when it was logged (the log from then on is read)."""
    from aae_ray.importing import line
    from aae_ray.rounds import enqueue

    imported = line(ws.root, ids=[image_id], since=at, echo=lambda *_: None)
    if image_id not in ws.pool_ids():
        why = imported.skipped[0]["reason"] if imported.skipped else "the prediction log kept no bytes for it"
        raise ValueError(f"image {image_id} cannot join the pool: {why}")
    q = enqueue(ws, [image_id])
    return (f"image {image_id} is in the pool and first in round {q.round_no}'s labeling queue "
            f"({'added' if q.added else 'moved up' if q.rewritten else 'already first'})")


"""The prediction log: every image `aae-ray serve` scored, in `WS/predictions/` (DESIGN.md), append-only.

Writing
    A replica's `PredictionLog.record` only appends rows to a buffer in memory (a lock and a list: no I/O on the
    request path). A background thread writes the buffer as one Parquet *fragment* every `flush_interval_s`, or
    sooner once `max_rows` wait; `close` writes what is left. A fragment is written by `aae_ray.atomic` (temporary
    file, fsync, rename), so a reader sees it whole or not at all. Writes are timed so that every recorded row is
    on disk `flush_interval_s` after it was recorded (a write takes its rows early by the time the previous write
    took), so a replica killed with SIGKILL loses at most the rows of its last flush interval. A kill's
    half-written temporary file is hidden from readers and deleted by the next compaction. A write that fails (a
    full disk) is logged, its rows are kept for the next try up to `max_pending` rows, and the request never sees
    it.

Files
    `f-<hour>-<write time>-<pid>-<random>.parquet`: a fragment, named by the hour (UTC) it was written in.
    `h-<hour>.parquet`: every row of that hour's fragments, written by `compact` once the hour is over (and a
    margin longer than any flush); it supersedes the hour's fragments, which are deleted after it is durable,
    so a reader never counts a row twice, even between the rename and the deletions or after a kill there.

Rows carry the model that answered (round and path), every score of the answer and, for the images chosen by
`images` ("flagged": the anomalies; "all"; "none") plus a `sample` share of the others, the image bytes; `id` is
the image's content id, the one a folder import gives the same bytes, so logged images can join the pool once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aae_ray.atomic import atomic_write, fsync_dir
from aae_ray.data.folder import content_id  # a folder import's id for the same bytes: logged images join once

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")), ("id", pa.string()), ("name", pa.string()), ("station", pa.string()),
    ("round", pa.int32()), ("model", pa.string()),
    ("score", pa.float64()), ("t2", pa.float64()), ("t2_local", pa.float64()), ("p_value", pa.float64()),
    ("threshold", pa.float64()), ("anomaly", pa.bool_()),
    ("image", pa.binary()),  # null unless the image was chosen for logging
])
ImagePolicy = Literal["flagged", "all", "none"]
UNNAMED_STATION = "unnamed"  # what a row without a station is called wherever stations are listed
FRAGMENT_PREFIX, HOUR_PREFIX = "f-", "h-"
HOUR_FORMAT = "%Y%m%dT%H"
COMPACT_MARGIN = timedelta(minutes=5)  # an hour is compacted this long after it ends: longer than any flush
COMPACT_EVERY_S = 600.0  # how often a writer's thread compacts the ended hours


@dataclass(frozen=True)
class LogSettings:
    images: ImagePolicy = "flagged"
    sample: float = 0.0  # the share of the other images whose bytes are logged too
    flush_interval_s: float = 1.0
    max_rows: int = 2048  # a buffer this long is written at once, whatever the interval
    max_pending: int = 100_000  # rows kept while writes fail; the oldest are dropped beyond it (and counted)

    def __post_init__(self):
        if self.images not in ("flagged", "all", "none"):
            raise ValueError(f"log images must be flagged, all or none, got {self.images!r}")
        if not 0.0 <= self.sample <= 1.0:
            raise ValueError(f"log sample must be in [0, 1], got {self.sample}")
        if not 0.0 < self.flush_interval_s <= 3600:
            raise ValueError(f"flush interval must be in (0, 3600] s, got {self.flush_interval_s}")


class PredictionLog:
    """Buffered, off-request-path writer of one process's rows into `folder`. Thread-safe."""

    def __init__(self, folder: Path, settings: LogSettings | None = None, *, seed: int | None = None):
        self.folder = Path(folder)
        self.settings = settings or LogSettings()
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one write at a time: the thread's and close's
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random(seed)
        self.written = 0  # rows in fragments so far
        self.dropped = 0  # rows given up after failed writes (max_pending)

    def record(self, results: Iterable[dict[str, Any]], images: Iterable[bytes], *, round_no: int | None,
               model: str | None, station: str | None = None, ts: datetime | None = None) -> None:
        """Queue one request's answers (one result dict an image, as `serving.score_images` gives) with the
        images' bytes. Never raises for the caller's sake: logging must not fail a request."""
        ts = ts or datetime.now(UTC)
        rows = [self._row(r, data, ts, round_no, model, station) for r, data in zip(results, images, strict=True)]
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self.settings.max_rows
        if full:
            self._wake.set()

    def _row(self, r: dict[str, Any], data: bytes, ts: datetime, round_no: int | None, model: str | None,
             station: str | None) -> dict[str, Any]:
        policy = self.settings.images
        keep = policy == "all" or (policy == "flagged" and bool(r.get("anomaly"))) or (
            policy != "none" and self._rng.random() < self.settings.sample)
        return {"ts": ts, "id": content_id(data), "name": r.get("name"), "station": station, "round": round_no,
                "model": model, **{k: r.get(k) for k in ("score", "t2", "t2_local", "p_value", "threshold")},
                "anomaly": bool(r.get("anomaly")), "image": data if keep else None}

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self) -> int:
        """Write the buffered rows as one fragment now; returns how many were written (0 on failure)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            try:
                write_fragment(self.folder, rows)
            except OSError as exc:
                log.error("prediction log: could not write %d rows to %s: %s", len(rows), self.folder, exc)
                with self._lock:
                    self._rows = rows + self._rows
                    over = len(self._rows) - self.settings.max_pending
                    if over > 0:
                        del self._rows[:over]
                        self.dropped += over
                return 0
            self.written += len(rows)
            return len(rows)

    def start(self) -> PredictionLog:
        def loop() -> None:
            # -inf, not 0: the monotonic clock counts from boot, so on a machine up for less than
            # COMPACT_EVERY_S a 0 would put off the first compaction.
            compacted, interval = -math.inf, self.settings.flush_interval_s
            due = time.monotonic() + interval
            while not self._stop.is_set():
                self._wake.wait(max(0.0, due - time.monotonic()))
                self._wake.clear()
                taken = time.monotonic()  # the rows recorded up to now go into this write
                self.flush()
                # The next write takes its rows early by what this one took, so it is on disk an interval after
                # this one took its rows: no recorded row waits longer than the interval, and a kill loses at
                # most the last interval's rows, however slow the disk.
                due = taken + interval - (time.monotonic() - taken)
                if time.monotonic() - compacted > COMPACT_EVERY_S:
                    compacted = time.monotonic()
                    try:
                        compact(self.folder)
                    except (OSError, ValueError) as exc:  # the next try, or a reader, names the file
                        log.error("prediction log: compaction of %s failed: %s", self.folder, exc)

        self._thread = threading.Thread(target=loop, name="aae-ray-prediction-log", daemon=True)
        self._thread.start()
        return self

    def close(self) -> int:
        """Stop the thread and write what is left; returns the rows of that last write."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.flush()


def write_fragment(folder: Path, rows: list[dict[str, Any]], *, now: datetime | None = None) -> Path:
    now = now or datetime.now(UTC)
    name = (f"{FRAGMENT_PREFIX}{now:{HOUR_FORMAT}}-{now:%M%S%f}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return atomic_write(Path(folder) / name, lambda f: pq.write_table(table, f))


def _hour_of(path: Path) -> str:
    return path.name.split("-")[1].removesuffix(".parquet")


def _files(folder: Path) -> tuple[dict[str, Path], list[Path], list[Path]]:
    """({hour: its hour file}, the fragments no hour file supersedes, those it does), hidden and temporary files
    left out."""
    if not folder.is_dir():
        return {}, [], []
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    hours = {_hour_of(p): p for p in files if p.name.startswith(HOUR_PREFIX)}
    fragments = [p for p in files if p.name.startswith(FRAGMENT_PREFIX)]
    return (hours, [p for p in fragments if _hour_of(p) not in hours],
            [p for p in fragments if _hour_of(p) in hours])


def read_predictions(folder: Path, *, columns: list[str] | None = None, since: datetime | None = None) -> pa.Table:
    """Every logged row once, in arrival order (`ts`, then file). Raises ValueError naming an unreadable file.
    `since`: only the rows logged from then on, read from the files of its hour and later alone (a row is written
    after it is logged, so no earlier file holds one)."""
    folder = Path(folder)
    first = since.astimezone(UTC).strftime(HOUR_FORMAT) if since is not None else ""
    wanted = columns
    if since is not None and columns is not None and "ts" not in columns:
        columns = [*columns, "ts"]  # to filter on; dropped again below
    for _ in range(10):
        hours, live, _ = _files(folder)
        try:
            tables = [_read(p, columns) for p in [*hours.values(), *live] if _hour_of(p) >= first]
        except FileNotFoundError:  # compacted while we read: list again
            continue
        schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        if since is not None:
            table = table.filter(pc.greater_equal(table.column("ts"), pa.scalar(since, SCHEMA.field("ts").type)))
        table = table.sort_by("ts") if "ts" in table.column_names else table
        return table.select(wanted) if wanted is not None else table
    raise ValueError(f"{folder}: files kept vanishing while reading")


def _read(path: Path, columns: list[str] | None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns).cast(
            pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"unreadable prediction log file {path}: {exc} (move it out of {path.parent})") from exc


def compact(folder: Path, *, now: datetime | None = None) -> int:
    """Merge each ended hour's fragments into its hour file, then delete them; returns the rows merged. Every
    writer's thread calls it every COMPACT_EVERY_S. Safe beside writers (they only write the current hour) and
    beside another compactor: both write the same hour file atomically from the same fragments, and one that
    finds a fragment gone (the other's deletions) leaves that hour to it."""
    folder = Path(folder)
    cutoff = (now or datetime.now(UTC)) - COMPACT_MARGIN
    open_hour = cutoff.strftime(HOUR_FORMAT)
    _, live, superseded = _files(folder)
    for p in superseded:  # left by a compaction killed between its hour file and its deletions
        p.unlink(missing_ok=True)
    for p in folder.glob(".*.tmp"):  # a writer killed mid-write (aae_ray.atomic); none takes minutes to write
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < cutoff.timestamp():
                p.unlink()
    merged = 0
    by_hour: dict[str, list[Path]] = {}
    for p in live:
        if _hour_of(p) < open_hour:
            by_hour.setdefault(_hour_of(p), []).append(p)
    for hour, paths in sorted(by_hour.items()):
        try:
            table = pa.concat_tables([_read(p, None) for p in paths]).sort_by("ts")
        except FileNotFoundError:  # another compactor has done this hour meanwhile
            continue
        atomic_write(folder / f"{HOUR_PREFIX}{hour}.parquet", lambda f, t=table: pq.write_table(t, f))
        for p in paths:
            p.unlink(missing_ok=True)
        fsync_dir(folder)
        merged += len(table)
    return merged

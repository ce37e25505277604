"""The label store: append-only label events in `WS/labels/*.parquet` (DESIGN.md "Label events").

This module is the only code that reads or writes `WS/labels/`; the labeling UI, the CLI and training go through it.

Storage
    Every `append` writes one new Parquet *fragment*; an existing file is never modified. A fragment is written
    by `aae_ray.atomic`: a hidden temporary file in the same folder (`.<name>.<pid>.<random>.tmp`), flushed and
    fsync'ed, renamed into place with `os.replace`, and then the folder itself is fsync'ed. A crash at any point
    leaves either no fragment or a complete one; a stray `.…tmp` file left by a killed writer is ignored by
    readers and swept by the next compaction once it is an hour old.
    Only `*.parquet` files whose name does not start with `.` are read.

Compaction
    Reading thousands of small files is slow (10,000 one-event fragments took 8 s), so once `COMPACT_AT`
    fragments have piled up, `append` merges every visible file into one *segment* (`segment-….parquet`, written
    the same atomic way) whose Parquet metadata lists the files it covers, and then deletes them. Readers skip
    any file a segment covers, so between the segment's rename and the deletions (or after a kill there) no
    event is seen twice, and none is lost: the covered files are deleted only after the segment is durable, and
    the next compaction finishes the deletions. One compactor runs at a time (an exclusive `flock` on
    `.compact.lock`; a writer that finds it taken just skips compacting). A reader that loses a file to a
    deletion mid-read lists the folder again. Each file's table is cached in the process, keyed on its name,
    size and modification time, so a page that reruns after one answer reads only the new fragment.

Order
    Each event carries `ts` (UTC, microseconds); all events of one `append` share it, and within one process `ts`
    strictly increases from call to call, so a process's later write always wins over its earlier one. The event
    log is ordered by `ts`, then by fragment file name, then by row within the fragment: a total, deterministic
    order. The current label of an image is the label of its last event in that order.

Labels
    `LABELS` (`defect`, `normal`, `skip`) are the labels a person gives. `skip` means "looked at it, no decision":
    `current_labels` reports it by default (a skipped image is labeled for queue purposes), while training uses
    only `defect`/`normal` (`aae_ray.dataset`); `current_labels(..., include_skip=False)` drops it.
    `UNSET` (`"unset"`) extends DESIGN's set for undo only: it means "no label" and `current_labels` never reports
    it. `append` accepts only `LABELS`; `UNSET` is written only by `undo`.

Undo
    `undo(labels_dir, id, labeler, round)` reverts the image's latest event by appending a new event whose label is
    the label the image had just before that event, or `UNSET` if it had none. It reverts exactly one event:
    undoing an undo redoes (defect, normal, undo -> defect, undo -> normal). Multi-step undo would need a marker
    outside DESIGN's fields, so it is not offered. The new event records who undid (`labeler`) and `round`, and
    keeps `t2`/`model` of the event it reverts. Undo decides from the events visible when it is called.

Errors
    A bad label, an empty id or labeler, or a bad round raises ValueError naming the problem before anything is
    written. A fragment that cannot be read (zero bytes, truncated, not Parquet, missing columns, null required
    fields, unknown labels) raises ValueError naming the file: labels are precious, so reading never silently
    drops events. Move such a file out of the folder to continue.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aae_ray.atomic import atomic_write, fsync_dir

LABELS = ("defect", "normal", "skip")
UNSET = "unset"  # undo only: "no label"; never reported by current_labels
EVENT_LABELS = (*LABELS, UNSET)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("labeler", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("round", pa.int32()),
        ("t2", pa.float64()),
        ("model", pa.string()),
    ]
)
_REQUIRED = ("id", "label", "labeler", "ts", "round")  # t2 and model may be null
COMPACT_AT = 64  # fragments beside the segments before an append compacts them
SEGMENT_PREFIX = "segment-"
COVERS_KEY = b"aae_ray.covers"  # a segment's Parquet metadata: the JSON list of file names it holds
FRAGMENT = "fragment"  # a segment's extra column: each event's original fragment (the log order's tie-break)
STALE_TMP_S = 3600  # a writer's temporary file lives milliseconds; one this old was left by a killed writer
LOCK_NAME = ".compact.lock"


@dataclass(frozen=True)
class LabelEvent:
    id: str
    label: str
    labeler: str
    round: int
    t2: float | None = None
    model: str | None = None


# --- writing ----------------------------------------------------------------------------------------------------


def append(labels_dir: Path, events: list[LabelEvent]) -> Path | None:
    """Write the events as one new fragment, atomically; returns its path (None for no events).

    Every event is checked before anything is written; a ValueError names the first problem found."""
    events = list(events)
    if not events:
        return None
    for i, e in enumerate(events):
        _check_event(e, LABELS, where=f"event {i}")
    return _append_checked(Path(labels_dir), events)


def undo(labels_dir: Path, id: str, labeler: str, round: int) -> LabelEvent | None:
    """Revert image `id`'s latest event with a new event (see the module docstring); None if it has no events."""
    _check_text(id, "id")
    _check_text(labeler, "labeler")
    _check_round(round)
    mine = _log(Path(labels_dir), id)
    if not mine:
        return None
    latest = mine[-1]
    restored = mine[-2]["label"] if len(mine) >= 2 else UNSET
    event = LabelEvent(id=id, label=restored, labeler=labeler, round=round, t2=latest["t2"], model=latest["model"])
    _append_checked(Path(labels_dir), [event])
    return event


def _append_checked(labels_dir: Path, events: list[LabelEvent]) -> Path:
    ts = _next_ts()
    table = pa.table(
        {"id": [e.id for e in events], "label": [e.label for e in events],
         "labeler": [e.labeler for e in events], "ts": [ts] * len(events),
         "round": [int(e.round) for e in events], "t2": [None if e.t2 is None else float(e.t2) for e in events],
         "model": [e.model for e in events]},
        schema=SCHEMA,
    )
    # Time first so a plain `ls` is (nearly) in write order; pid + random hex keep concurrent writers apart.
    name = f"{ts:%Y%m%dT%H%M%S%f}Z-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
    path = _write_fragment(labels_dir, name, table)
    if sum(not p.name.startswith(SEGMENT_PREFIX) for p in fragments(labels_dir)) >= COMPACT_AT:
        compact(labels_dir, wait=False)
    return path


def _write_fragment(
    labels_dir: Path, name: str, table: pa.Table, before_replace: Callable[[Path], None] | None = None
) -> Path:
    """One fragment, written atomically and durably (aae_ray.atomic). `before_replace` is a test hook."""
    return atomic_write(labels_dir / name, lambda f: pq.write_table(table, f), before_replace)


_ts_lock = threading.Lock()
_last_ts: datetime | None = None


def _next_ts() -> datetime:
    """Now (UTC, microseconds), strictly later than this process's previous write even if the clock stalls."""
    global _last_ts
    with _ts_lock:
        ts = datetime.now(UTC)
        if _last_ts is not None and ts <= _last_ts:
            ts = _last_ts + timedelta(microseconds=1)
        _last_ts = ts
        return ts


def compact(labels_dir: Path, *, wait: bool = True, before_delete: Callable[[Path], None] | None = None) -> int:
    """Merge every visible fragment and segment into one new segment, then delete what it covers (module
    docstring: Compaction); returns the number of events in it (0 when there was nothing to merge, or when
    `wait=False` and another process is compacting). `before_delete` is a test hook."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        return 0
    with open(labels_dir / LOCK_NAME, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return 0
        _sweep_stale_temp_files(labels_dir)
        table, live, covered = _read_visible(labels_dir)
        if len(live) <= 1:
            _delete(covered)
            return 0
        ts = _next_ts()
        name = f"{SEGMENT_PREFIX}{ts:%Y%m%dT%H%M%S%f}Z-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
        covers = sorted({p.name for p in live} | {p.name for p in covered})
        segment = table.replace_schema_metadata({COVERS_KEY: json.dumps(covers).encode()})
        atomic_write(labels_dir / name, lambda f: pq.write_table(segment, f))
        if before_delete is not None:
            before_delete(labels_dir / name)
        _delete([*live, *covered])
        return len(table)


def _delete(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    if paths:
        fsync_dir(paths[0].parent)


def _sweep_stale_temp_files(labels_dir: Path) -> None:
    cutoff = time.time() - STALE_TMP_S
    for p in labels_dir.glob(".*.tmp"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except FileNotFoundError:
            pass


def _check_event(e: LabelEvent, allowed: tuple[str, ...], where: str) -> None:
    if e.label not in allowed:
        raise ValueError(f"unknown label {e.label!r} ({where}); allowed: {list(allowed)}")
    _check_text(e.id, f"id ({where})")
    _check_text(e.labeler, f"labeler ({where})")
    _check_round(e.round, where)
    if e.t2 is not None and (isinstance(e.t2, bool) or not isinstance(e.t2, numbers.Real)):
        raise ValueError(f"t2 must be a number or None ({where}), got {e.t2!r}")
    if e.model is not None and not isinstance(e.model, str):
        raise ValueError(f"model must be a string or None ({where}), got {e.model!r}")


def _check_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _check_round(value: object, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**31:
        raise ValueError(f"round must be an integer >= 0{f' ({where})' if where else ''}, got {value!r}")


# --- reading ----------------------------------------------------------------------------------------------------


def fragments(labels_dir: Path) -> list[Path]:
    """The visible fragments, by name (temporary and hidden files excluded)."""
    labels_dir = Path(labels_dir)
    if not labels_dir.exists():
        return []
    if not labels_dir.is_dir():
        raise ValueError(f"{labels_dir} is not a folder")
    return sorted(p for p in labels_dir.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def read_events(labels_dir: Path) -> pa.Table:
    """Every event, in log order (ts, then fragment name, then row). Raises ValueError naming a bad fragment."""
    return _read_visible(Path(labels_dir))[0].drop_columns([FRAGMENT])


def _read_visible(labels_dir: Path) -> tuple[pa.Table, list[Path], list[Path]]:
    """(every event in log order with its `fragment` column, the files read, the files a segment covers)."""
    for _ in range(10):
        files = fragments(labels_dir)
        try:
            read = {p: _cached_read(p) for p in files}
        except FileNotFoundError:  # a compaction deleted it meanwhile: its segment is there now
            continue
        covered = {name for _, covers in read.values() for name in covers}
        live = [p for p in files if p.name not in covered]
        _prune_cache(labels_dir, files)
        if not live:
            return _EMPTY, [], [p for p in files if p.name in covered]
        table = pa.concat_tables([read[p][0] for p in live])
        ordered = table.sort_by([("ts", "ascending"), (FRAGMENT, "ascending")])  # stable: rows keep their order
        return ordered, live, [p for p in files if p.name in covered]
    raise ValueError(f"{labels_dir}: files kept vanishing while reading (is something deleting label files?)")


_EMPTY = pa.schema([*SCHEMA, pa.field(FRAGMENT, pa.string())]).empty_table()
_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int], pa.Table, list[str]]] = {}


def _cached_read(path: Path) -> tuple[pa.Table, list[str]]:
    """(the file's events with their `fragment` column, the names it covers if a segment); cached on the
    file's size and modification time: files are never modified, so a changed key means a new file."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    table, covers = _read_file(path)
    with _cache_lock:
        _cache[path] = (key, table, covers)
    return table, covers


def _prune_cache(labels_dir: Path, present: list[Path]) -> None:
    keep = set(present)
    with _cache_lock:
        for p in [p for p in _cache if p.parent == labels_dir and p not in keep]:
            del _cache[p]


def _read_file(path: Path) -> tuple[pa.Table, list[str]]:
    table = _read_fragment(path)
    if not path.name.startswith(SEGMENT_PREFIX):
        return table.append_column(FRAGMENT, pa.array([path.name] * len(table), pa.string())), []
    covers = json.loads(table.schema.metadata[COVERS_KEY])
    return table.replace_schema_metadata(None), list(covers)


def _read_fragment(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"unreadable label fragment {path}: {exc} (move it out of {path.parent} to go on)") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"label fragment {path} lacks column(s) {missing}")
    try:
        checked = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise ValueError(f"label fragment {path} does not have the label schema: {exc}") from exc
    nulls = [n for n in _REQUIRED if checked.column(n).null_count]
    if nulls:
        raise ValueError(f"label fragment {path} has empty {nulls}")
    bad = set(checked.column("label").to_pylist()) - set(EVENT_LABELS)
    if bad:
        raise ValueError(f"label fragment {path} has unknown label(s) {sorted(bad)}")
    if path.name.startswith(SEGMENT_PREFIX):  # keep its fragment column and the list of what it covers
        if FRAGMENT not in table.column_names or COVERS_KEY not in (table.schema.metadata or {}):
            raise ValueError(f"label segment {path} lacks its list of covered files (move it out of "
                             f"{path.parent} to go on)")
        checked = checked.append_column(FRAGMENT, table.column(FRAGMENT).cast(pa.string()))
        return checked.replace_schema_metadata({COVERS_KEY: table.schema.metadata[COVERS_KEY]})
    return checked


def _log(labels_dir: Path, id: str | None = None) -> list[dict]:
    table = read_events(labels_dir)
    if id is not None:
        table = table.filter(pc.equal(table.column("id"), id))
    return table.to_pylist()


def current_labels(labels_dir: Path, *, include_skip: bool = True) -> dict[str, str]:
    """id -> the label of its latest event. Images whose latest event is an undo to "no label" are absent;
    `skip` is included unless include_skip=False (training reads only defect/normal either way)."""
    table = read_events(labels_dir)
    latest = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))  # last wins
    dropped = {UNSET} if include_skip else {UNSET, "skip"}
    return {id_: label for id_, label in latest.items() if label not in dropped}


def history(labels_dir: Path, id: str | None = None, limit: int | None = None) -> list[dict]:
    """Events newest first, as dicts with DESIGN's fields (ts a UTC datetime); optionally one image's, or the
    `limit` newest."""
    table = read_events(labels_dir)
    if id is not None:
        table = table.filter(pc.equal(table.column("id"), id))
    if limit is not None:
        table = table.slice(max(len(table) - max(limit, 0), 0))
    events = table.to_pylist()
    events.reverse()
    return events


def csv_bytes(labels_dir: Path) -> bytes:
    """Every event, oldest first, as CSV with a header (ts in ISO 8601 with +00:00, empty for null)."""
    return _csv(read_events(labels_dir))


def export_csv(labels_dir: Path, path: Path) -> int:
    """Write `csv_bytes` to `path` atomically, like a fragment. Returns the number of rows written."""
    table = read_events(labels_dir)
    data = _csv(table)
    atomic_write(Path(path), lambda f: f.write(data))
    return len(table)


def _csv(table: pa.Table) -> bytes:
    # The csv module, not pyarrow's writer: pyarrow quotes every string, the header too, where a quote is needed
    # only around a comma, a quote or a line break.
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCHEMA.names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_row(e) for e in table.to_pylist())
    return buf.getvalue().encode("utf-8")


def _csv_row(e: dict) -> dict:
    row = {k: ("" if v is None else v) for k, v in e.items()}
    row["ts"] = e["ts"].isoformat(timespec="microseconds")
    if e["t2"] is not None:
        row["t2"] = repr(float(e["t2"]))
    return row

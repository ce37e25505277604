"""The label store: append-only label events in `WS/labels/*.parquet` (DESIGN.md "Label events").

This module is the only code that reads or writes `WS/labels/`; the labeling UI, the CLI and training go through it.

Storage
    Every `append` writes one new Parquet *fragment*; nothing is ever rewritten or deleted. A fragment is written
    by `aae_ray.atomic`: a hidden temporary file in the same folder (`.<name>.<pid>.<random>.tmp`), flushed and
    fsync'ed, renamed into place with `os.replace`, and then the folder itself is fsync'ed. A crash at any point
    leaves either no fragment or a complete one; a stray `.…tmp` file left by a killed writer is ignored by
    readers (and may be deleted by hand).
    Only `*.parquet` files whose name does not start with `.` are read.

Concurrency
    Fragment names are `<UTC time>Z-<pid>-<random hex>.parquet`, created exclusively, so any number of threads and
    processes can append at once without losing an event; no code path reads, modifies and rewrites a file.

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
import io
import numbers
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aae_ray.atomic import atomic_write

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
    mine = [e for e in _log(Path(labels_dir)) if e["id"] == id]
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
    return _write_fragment(labels_dir, name, table)


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
    tables = [_read_fragment(f) for f in fragments(labels_dir)]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)  # fragment-name order, rows in file order
    ts = pc.cast(table.column("ts"), pa.int64()).to_numpy()
    return table.take(pa.array(np.argsort(ts, kind="stable")))


def _read_fragment(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"unreadable label fragment {path}: {exc} (move it out of {path.parent} to go on)") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"label fragment {path} lacks column(s) {missing}")
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise ValueError(f"label fragment {path} does not have the label schema: {exc}") from exc
    nulls = [n for n in _REQUIRED if table.column(n).null_count]
    if nulls:
        raise ValueError(f"label fragment {path} has empty {nulls}")
    bad = set(table.column("label").to_pylist()) - set(EVENT_LABELS)
    if bad:
        raise ValueError(f"label fragment {path} has unknown label(s) {sorted(bad)}")
    return table


def _log(labels_dir: Path) -> list[dict]:
    return read_events(labels_dir).to_pylist()


def current_labels(labels_dir: Path, *, include_skip: bool = True) -> dict[str, str]:
    """id -> the label of its latest event. Images whose latest event is an undo to "no label" are absent;
    `skip` is included unless include_skip=False (training reads only defect/normal either way)."""
    latest: dict[str, str] = {}
    for e in _log(labels_dir):
        latest[e["id"]] = e["label"]
    dropped = {UNSET} if include_skip else {UNSET, "skip"}
    return {id_: label for id_, label in latest.items() if label not in dropped}


def history(labels_dir: Path, id: str | None = None, limit: int | None = None) -> list[dict]:
    """Events newest first, as dicts with DESIGN's fields (ts a UTC datetime); optionally one image's, or the
    `limit` newest."""
    events = _log(labels_dir)
    if id is not None:
        events = [e for e in events if e["id"] == id]
    events.reverse()
    return events if limit is None else events[: max(limit, 0)]


def export_csv(labels_dir: Path, path: Path) -> int:
    """Write every event, oldest first, as CSV with a header (ts in ISO 8601 with +00:00, empty for null);
    written atomically like a fragment. Returns the number of rows written."""
    events = _log(labels_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCHEMA.names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_row(e) for e in events)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue().encode("utf-8")))
    return len(events)


def _csv_row(e: dict) -> dict:
    row = {k: ("" if v is None else v) for k, v in e.items()}
    row["ts"] = e["ts"].isoformat(timespec="microseconds")
    if e["t2"] is not None:
        row["t2"] = repr(float(e["t2"]))
    return row

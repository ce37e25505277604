"""Append-only label events (`WS/labels/*.parquet`), one file per write, written atomically.

The current label of an image is its latest event; nothing is rewritten, an undo is a new event."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aae_ray.data.images import write_table_with

LABELS = ("defect", "normal", "skip")
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


@dataclass(frozen=True)
class LabelEvent:
    id: str
    label: str
    labeler: str
    round: int
    t2: float | None = None
    model: str | None = None


def append(labels_dir: Path, events: list[LabelEvent]) -> Path | None:
    """Write the events as one new file; returns its path (None for no events)."""
    if not events:
        return None
    bad = {e.label for e in events} - set(LABELS)
    if bad:
        raise ValueError(f"unknown label(s) {sorted(bad)}; allowed: {list(LABELS)}")
    ts = datetime.now(UTC)
    table = pa.table(
        {"id": [e.id for e in events], "label": [e.label for e in events],
         "labeler": [e.labeler for e in events], "ts": [ts] * len(events),
         "round": [e.round for e in events], "t2": [e.t2 for e in events], "model": [e.model for e in events]},
        schema=SCHEMA,
    )
    # Time first so a plain `ls` is in write order; the uuid keeps two labelers from colliding.
    path = labels_dir / f"{ts.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
    write_table_with(table, path, SCHEMA)
    return path


def read_events(labels_dir: Path) -> pa.Table:
    files = sorted(labels_dir.glob("*.parquet")) if labels_dir.exists() else []
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f).cast(SCHEMA) for f in files])


def current_labels(labels_dir: Path) -> dict[str, str]:
    """id -> latest label (events ordered by timestamp, then by file order)."""
    events = read_events(labels_dir).to_pylist()
    latest: dict[str, str] = {}
    for e in sorted(enumerate(events), key=lambda ie: (ie[1]["ts"], ie[0])):
        latest[e[1]["id"]] = e[1]["label"]
    return latest

"""The label store (aae_ray/labels.py, DESIGN.md "Label events"): atomic append-only fragments, no lost events under
concurrent writers, a total event order, undo as a new event, history, CSV export and clear errors."""

import csv
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aae_ray import labels
from aae_ray.dataset import training_arrays
from aae_ray.labels import SCHEMA, UNSET, LabelEvent, current_labels, export_csv, history, read_events, undo
from aae_ray.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def event(id_: str, label: str, labeler: str = "ana", round_: int = 0, t2: float | None = 12.5) -> LabelEvent:
    return LabelEvent(id=id_, label=label, labeler=labeler, round=round_, t2=t2, model="rounds/r000/model")


def raw_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def row(id_: str, label: str, ts: datetime, labeler: str = "ana") -> dict:
    return {"id": id_, "label": label, "labeler": labeler, "ts": ts, "round": 0, "t2": None, "model": None}


def run_child(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def kill_when_ready(child: subprocess.Popen, ready: Path) -> None:
    """SIGKILL the child once it has written `ready` (it is then hanging where the test wants it killed)."""
    try:
        wait_for(ready)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"child never reached {path.name}"
        time.sleep(0.02)


# --- atomic writes ----------------------------------------------------------------------------------------------


def test_an_append_leaves_exactly_one_named_fragment(tmp_path):
    path = labels.append(tmp_path, [event("a", "defect"), event("b", "normal")])
    assert list(tmp_path.iterdir()) == [path]
    stamp, pid, rand = path.stem.split("-")
    assert stamp.endswith("Z") and pid == str(os.getpid()) and len(rand) == 12
    assert pq.read_table(path).num_rows == 2


def test_fragment_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    labels.append(tmp_path, [event("a", "defect")])
    assert calls == ["fsync", "replace", "fsync"]


def test_a_failed_rename_leaves_no_fragment_and_no_temp_file(tmp_path, monkeypatch):
    labels.append(tmp_path, [event("a", "defect")])
    before = sorted(tmp_path.iterdir())

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        labels.append(tmp_path, [event("a", "normal")])
    monkeypatch.undo()
    assert sorted(tmp_path.iterdir()) == before
    assert current_labels(tmp_path) == {"a": "defect"}
    assert len(read_events(tmp_path)) == 1


def test_a_writer_killed_before_the_rename_leaves_nothing_readers_see(tmp_path):
    ready = tmp_path / "ready"
    folder = tmp_path / "labels"
    labels.append(folder, [event("a", "defect")])
    child = run_child(
        "import sys, time\nfrom pathlib import Path\nimport pyarrow as pa\nfrom aae_ray import labels\n"
        f"folder, ready = Path({str(folder)!r}), Path({str(ready)!r})\n"
        "table = pa.Table.from_pylist([dict(id='a', label='normal', labeler='ben', ts=labels._next_ts(), round=1,"
        " t2=None, model=None)], schema=labels.SCHEMA)\n"
        "def hang(tmp):\n    ready.write_text(str(tmp))\n    time.sleep(60)\n"
        "labels._write_fragment(folder, 'zzz-killed.parquet', table, before_replace=hang)\n"
    )
    kill_when_ready(child, ready)
    tmp = Path(ready.read_text())
    assert tmp.exists() and tmp.stat().st_size > 0  # the complete temp file is still there ...
    assert not (folder / "zzz-killed.parquet").exists()  # ... but never became a fragment
    assert len(read_events(folder)) == 1 and current_labels(folder) == {"a": "defect"}
    labels.append(folder, [event("a", "normal")])  # writers carry on
    assert current_labels(folder) == {"a": "normal"}


def test_stray_temp_hidden_and_other_files_are_ignored(tmp_path):
    labels.append(tmp_path, [event("a", "defect")])
    (tmp_path / ".20240101T000000000000Z-1-abc.parquet.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / ".hidden.parquet").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not labels")
    assert current_labels(tmp_path) == {"a": "defect"}


# --- concurrency and order --------------------------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from aae_ray import labels
folder, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
while not go.exists():
    time.sleep(0.005)
for i in range(50):
    labels.append(folder, [labels.LabelEvent(id=f"{name}-{i}", label="defect", labeler=name, round=0)])
"""


def test_four_processes_appending_at_once_lose_nothing(tmp_path):
    folder, go = tmp_path / "labels", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    names = [f"p{k}" for k in range(4)]
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(go), n], env=env,
                                 stderr=subprocess.PIPE, text=True) for n in names]
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    events = read_events(folder)
    assert len(events) == 200
    assert sorted(events.column("id").to_pylist()) == sorted(f"{n}-{i}" for n in names for i in range(50))
    assert not list(folder.glob(".*.tmp"))  # (200 appends compacted the store on the way: fewer files than events)
    assert len({r["ts"] for r in events.to_pylist() if r["labeler"] == "p0"}) == 50


def test_latest_event_wins_even_when_the_clock_stands_still(tmp_path, monkeypatch):
    frozen = datetime(2030, 1, 1, tzinfo=UTC)

    class StoppedClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(labels, "datetime", StoppedClock)
    for i in range(30):
        labels.append(tmp_path, [event("a", ("defect", "normal", "skip")[i % 3])])
    assert current_labels(tmp_path) == {"a": "skip"}  # i = 29 -> skip
    stamps = read_events(tmp_path).column("ts").to_pylist()
    assert stamps == sorted(stamps) and len(set(stamps)) == 30


def write_tied_fragments(folder: Path) -> datetime:
    """Four fragments whose events tie on ts, so that only the fragment name and the row order decide; returns
    the tied ts."""
    t0, t1 = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 2, tzinfo=UTC)
    labels._write_fragment(folder, "a-late.parquet", raw_table([row("x", "normal", t1)]))
    labels._write_fragment(folder, "c-tie.parquet", raw_table([row("y", "skip", t0)]))
    labels._write_fragment(folder, "b-tie.parquet", raw_table([row("y", "defect", t0), row("y", "normal", t0)]))
    labels._write_fragment(folder, "d-early.parquet", raw_table([row("x", "defect", t0)]))
    return t0


def test_log_order_is_ts_then_fragment_name_then_row(tmp_path):
    write_tied_fragments(tmp_path)
    order = [(r["id"], r["label"]) for r in read_events(tmp_path).to_pylist()]
    assert order == [("y", "defect"), ("y", "normal"), ("y", "skip"), ("x", "defect"), ("x", "normal")]
    assert current_labels(tmp_path) == {"x": "normal", "y": "skip"}


def test_nothing_is_ever_rewritten(tmp_path):
    first = labels.append(tmp_path, [event("a", "defect")])
    content = first.read_bytes()
    labels.append(tmp_path, [event("a", "normal")])
    undo(tmp_path, "a", "ben", 1)
    assert first.read_bytes() == content
    assert len(list(tmp_path.glob("*.parquet"))) == 3


# --- undo, skip, history, export --------------------------------------------------------------------------------


def test_undo_restores_the_previous_label_and_undoing_twice_redoes(tmp_path):
    labels.append(tmp_path, [event("a", "defect")])
    labels.append(tmp_path, [event("a", "normal")])
    labels.append(tmp_path, [event("b", "normal")])
    made = undo(tmp_path, "a", "ben", 3)
    assert made == LabelEvent(id="a", label="defect", labeler="ben", round=3, t2=12.5, model="rounds/r000/model")
    assert current_labels(tmp_path) == {"a": "defect", "b": "normal"}
    undo(tmp_path, "a", "ben", 3)
    assert current_labels(tmp_path)["a"] == "normal"
    assert [e["label"] for e in history(tmp_path, id="a")] == ["normal", "defect", "normal", "defect"]


def test_undo_of_an_only_event_means_no_label(tmp_path):
    labels.append(tmp_path, [event("a", "defect"), event("b", "skip")])
    assert undo(tmp_path, "a", "ana", 0).label == UNSET
    assert current_labels(tmp_path) == {"b": "skip"}
    assert history(tmp_path)[0]["label"] == UNSET
    assert undo(tmp_path, "a", "ana", 0).label == "defect"  # undo the undo
    assert current_labels(tmp_path) == {"a": "defect", "b": "skip"}


def test_undo_of_an_image_without_events_writes_nothing(tmp_path):
    assert undo(tmp_path / "labels", "a", "ana", 0) is None
    labels.append(tmp_path / "labels", [event("b", "defect")])
    assert undo(tmp_path / "labels", "a", "ana", 0) is None
    assert len(read_events(tmp_path / "labels")) == 1


def test_an_undone_defect_no_longer_trains_as_a_defect(ws_copy):
    ws = Workspace.open(ws_copy)
    pool = [r["id"] for r in ws.images().select(["id", "split"]).to_pylist() if r["split"] == "pool"][0]

    def y_of(id_: str) -> int:
        arr = training_arrays(ws, 32)
        return arr.y.tolist()[arr.ids.index(id_)]

    labels.append(ws.labels_dir, [event(pool, "defect")])
    assert y_of(pool) == 1
    undo(ws.labels_dir, pool, "ana", 0)
    assert y_of(pool) == 0


def test_skip_counts_as_labeled_unless_asked_not_to(tmp_path):
    labels.append(tmp_path, [event("a", "skip"), event("b", "defect"), event("c", "normal")])
    assert current_labels(tmp_path) == {"a": "skip", "b": "defect", "c": "normal"}
    assert current_labels(tmp_path, include_skip=False) == {"b": "defect", "c": "normal"}


def test_history_is_newest_first(tmp_path):
    labels.append(tmp_path, [event("a", "defect"), event("b", "normal")])
    labels.append(tmp_path, [event("c", "skip", "ben", round_=2, t2=None)])
    labels.append(tmp_path, [event("a", "normal")])
    got = history(tmp_path)
    assert [(e["id"], e["label"]) for e in got] == [("a", "normal"), ("c", "skip"), ("b", "normal"), ("a", "defect")]
    assert got[1] == {"id": "c", "label": "skip", "labeler": "ben", "ts": got[1]["ts"], "round": 2, "t2": None,
                      "model": "rounds/r000/model"}
    assert got[1]["ts"].tzinfo is not None
    assert [e["id"] for e in history(tmp_path, limit=2)] == ["a", "c"]
    assert history(tmp_path / "none") == []


def test_csv_export_round_trips_every_event(tmp_path):
    folder = tmp_path / "labels"
    labels.append(folder, [event("a", "defect"), event("b,with comma", "normal", t2=None)])
    labels.append(folder, [event("a", "skip", "ben", round_=4, t2=0.1)])
    out = tmp_path / "export" / "labels.csv"
    assert export_csv(folder, out) == 3
    with open(out, newline="", encoding="utf-8") as f:
        assert f.readline().strip() == "id,label,labeler,ts,round,t2,model"
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert all(r["ts"].endswith("+00:00") for r in rows)
    parsed = [{**r, "ts": datetime.fromisoformat(r["ts"]), "round": int(r["round"]),
               "t2": float(r["t2"]) if r["t2"] else None, "model": r["model"] or None} for r in rows]
    assert parsed == read_events(folder).to_pylist()
    assert export_csv(tmp_path / "empty", tmp_path / "empty.csv") == 0
    assert (tmp_path / "empty.csv").read_text() == "id,label,labeler,ts,round,t2,model\n"
    assert not list(out.parent.glob(".*"))


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (event("a", "maybe"), "unknown label 'maybe'"),
        (event("a", UNSET), "unknown label 'unset'"),
        (event("", "defect"), "id"),
        (event("  ", "defect"), "id"),
        (event("a", "defect", labeler=""), "labeler"),
        (event("a", "defect", round_=-1), "round"),
        (LabelEvent(id="a", label="defect", labeler="ana", round="1"), "round"),
        (event("a", "defect", t2="high"), "t2"),
    ],
)
def test_bad_events_are_rejected_before_anything_is_written(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        labels.append(tmp_path, [event("ok", "defect"), bad])
    assert not list(tmp_path.iterdir())


def test_numpy_scalars_from_score_tables_are_accepted(tmp_path):
    labels.append(tmp_path, [LabelEvent(id="a", label="defect", labeler="ana", round=np.int64(2), t2=np.float32(1.5))])
    (got,) = read_events(tmp_path).to_pylist()
    assert (got["round"], got["t2"]) == (2, 1.5)


def test_bad_undo_arguments_are_rejected(tmp_path):
    labels.append(tmp_path, [event("a", "defect")])
    for args, match in [(("", "ana", 0), "id"), (("a", "", 0), "labeler"), (("a", "ana", -1), "round")]:
        with pytest.raises(ValueError, match=match):
            undo(tmp_path, *args)
    assert len(read_events(tmp_path)) == 1


def corrupt_empty(path: Path, good: bytes) -> None:
    path.write_bytes(b"")


def corrupt_truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


def corrupt_text(path: Path, good: bytes) -> None:
    path.write_text("id,label\na,defect\n")


def corrupt_missing_column(path: Path, good: bytes) -> None:
    pq.write_table(pa.table({"id": ["a"], "label": ["defect"]}), path)


def corrupt_unknown_label(path: Path, good: bytes) -> None:
    pq.write_table(raw_table([row("a", "maybe", datetime(2030, 1, 1, tzinfo=UTC))]), path)


def corrupt_null_id(path: Path, good: bytes) -> None:
    pq.write_table(raw_table([{**row("a", "defect", datetime(2030, 1, 1, tzinfo=UTC)), "id": None}]), path)


@pytest.mark.parametrize("corrupt", [corrupt_empty, corrupt_truncated, corrupt_text, corrupt_missing_column,
                                     corrupt_unknown_label, corrupt_null_id])
def test_a_bad_fragment_is_a_clear_error_naming_the_file(tmp_path, corrupt):
    good = labels.append(tmp_path, [event("a", "defect")])
    bad = tmp_path / "20240101T000000000000Z-copied-in.parquet"
    corrupt(bad, good.read_bytes())
    for read in (read_events, current_labels, history):
        with pytest.raises(ValueError, match=str(bad.name)) as info:
            read(tmp_path)
        assert type(info.value) is ValueError  # ours, not a pyarrow error
    with pytest.raises(ValueError, match=bad.name):
        undo(tmp_path, "a", "ana", 0)
    bad.unlink()
    assert current_labels(tmp_path) == {"a": "defect"}


def test_a_file_where_the_folder_should_be_is_an_error(tmp_path):
    (tmp_path / "labels").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        read_events(tmp_path / "labels")


# --- compaction: few files, the same events ----------------------------------------------------------------------


def _files(folder):
    return sorted(p.name for p in folder.glob("*.parquet"))


def test_compaction_keeps_every_event_and_the_log_order(tmp_path):
    t0 = write_tied_fragments(tmp_path)
    for i in range(5):
        labels.append(tmp_path, [event(f"z{i}", "defect")])
    before = read_events(tmp_path).to_pylist()
    assert labels.compact(tmp_path) == len(before) == 10
    assert len(_files(tmp_path)) == 1 and _files(tmp_path)[0].startswith(labels.SEGMENT_PREFIX)
    assert read_events(tmp_path).to_pylist() == before
    labels._write_fragment(tmp_path, "b0-tie-after.parquet", raw_table([row("y", "defect", t0)]))
    order = [(r["id"], r["label"]) for r in read_events(tmp_path).to_pylist()][:4]
    assert order == [("y", "defect"), ("y", "normal"), ("y", "defect"), ("y", "skip")]  # name order across files


def test_appends_compact_the_store_once_fragments_pile_up(tmp_path, monkeypatch):
    monkeypatch.setattr(labels, "COMPACT_AT", 5)
    for i in range(23):
        labels.append(tmp_path, [event(f"a{i}", "defect" if i % 2 else "normal")])
    assert len(_files(tmp_path)) < 6
    assert current_labels(tmp_path) == {f"a{i}": "defect" if i % 2 else "normal" for i in range(23)}
    assert len(read_events(tmp_path)) == 23


def test_a_compactor_killed_before_its_deletions_loses_and_duplicates_nothing(tmp_path):
    folder, ready = tmp_path / "labels", tmp_path / "ready"
    for i in range(6):
        labels.append(folder, [event(f"a{i}", "defect")])
    child = run_child(
        "import time\nfrom pathlib import Path\nfrom aae_ray import labels\n"
        f"folder, ready = Path({str(folder)!r}), Path({str(ready)!r})\n"
        "def hang(segment):\n    ready.write_text(str(segment))\n    time.sleep(60)\n"
        "labels.compact(folder, before_delete=hang)\n"
    )
    kill_when_ready(child, ready)
    assert len(_files(folder)) == 7  # the segment and the six fragments it covers
    assert sorted(read_events(folder).column("id").to_pylist()) == [f"a{i}" for i in range(6)]
    labels.append(folder, [event("a0", "normal")])  # writers carry on
    labels.compact(folder)  # and the next compaction finishes the deletions
    assert len(_files(folder)) == 1
    assert current_labels(folder) == {"a0": "normal", **{f"a{i}": "defect" for i in range(1, 6)}}


def test_stale_temp_files_of_killed_writers_are_swept_fresh_ones_kept(tmp_path):
    labels.append(tmp_path, [event("a", "defect")])
    labels.append(tmp_path, [event("b", "defect")])
    stale, fresh = tmp_path / ".old.parquet.1.ab.tmp", tmp_path / ".new.parquet.2.cd.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"PAR1 half")
    old = time.time() - labels.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    labels.compact(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_a_segment_without_its_cover_list_is_a_clear_error(tmp_path):
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    labels._write_fragment(tmp_path, f"{labels.SEGMENT_PREFIX}bad.parquet", raw_table([row("x", "normal", t0)]))
    with pytest.raises(ValueError, match="lacks its list of covered files"):
        read_events(tmp_path)

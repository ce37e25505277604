"""What a serving replica's alarm check costs as the line's log grows: the whole log read again
(`monitor.check_alarms`, what the monitor page and `aae-ray monitor --report` do) against the check that goes on
from where the last one folded the log in (`monitor.check_new_alarms`, what `check_alarms_if_due` runs every
`alarm_check_s` in each replica).

A synthetic workspace gets a one-epoch model at 32x32 (bench/serve_load.py's `make_workspace`: the benchmark
measures the check, not accuracy). Its log is synthetic: one station at --rate images/s, in-control scores
drawn from the model's calibration scores, written as compacted hour files (what `prediction_log.compact`
leaves) for --hours of line time, the last hour still open. Each size is timed --repeats times, medians:
- `whole_s`: `check_alarms(ws, now=end)`;
- `incremental_s`: `check_new_alarms(ws, now=end)`, after one such check an hour as the log was written (what the
  replicas' checks leave: each station's chart at every ended hour); it reads the rows since the last folded hour;
- `chart_whole_s` / `chart_24h_s`: the monitor page's chart of everything (`line_chart`) against its default
  window, the last 24 hours (`window_chart`, from the checkpoint before it);
- `figures_24h_s` / `figures_24h_every_point_s`: the page's three figures of that window drawn and saved as PNG,
  thinned to `monitor_report.MAX_POINTS` a station (what the page draws) and with every point (the baseline).
That the checks which go on record the whole log's alarms is tests/test_monitor.py's to show, not this script's.
And what reading the recorded alarms costs (every check, GET /health, `aae-ray status`) when --alarm-files
checks have each written one alarm file, as a line that alarms every check leaves them, before and after the
merge a writer now does beyond `monitor.ALARM_FILES_KEPT` files.

    python bench/alarm_check.py [--hours 1 6 24 72] [--rate 10] [--alarm-files 3000] [--repeats 3]
                                [--out bench/results]
"""

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)
from serve_load import make_workspace  # noqa: E402

from aae_ray import artifacts, monitor, monitor_report  # noqa: E402
from aae_ray.prediction_log import HOUR_FORMAT, HOUR_PREFIX, SCHEMA  # noqa: E402
from aae_ray.workspace import Workspace  # noqa: E402

START = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)


def write_hour(ws: Workspace, h: int, n: int, rate: float, rng: np.random.Generator) -> None:
    """Hour h's file of `n` in-control images, as compaction leaves it."""
    limit = artifacts.read_limit(ws.model_dir(0))
    hour = START + timedelta(hours=h)
    ts = pa.array([hour + timedelta(seconds=i / rate) for i in range(n)], SCHEMA.field("ts").type)
    score = rng.choice(limit.calibration, n) * rng.uniform(0.98, 1.02, n)
    cols = {"ts": ts, "id": pa.array([f"{h:04d}{i:08d}" for i in range(n)]), "station": pa.array(["cam-1"] * n),
            "round": pa.array(np.zeros(n, np.int32)), "model": pa.array(["rounds/r000/model"] * n),
            "score": pa.array(score), "t2": pa.array(score), "p_value": pa.array(limit.p_value(score)),
            "threshold": pa.array(np.full(n, limit.threshold)), "anomaly": pa.array(score > limit.threshold)}
    table = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA}, schema=SCHEMA)
    ws.predictions_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, ws.predictions_dir / f"{HOUR_PREFIX}{hour:{HOUR_FORMAT}}.parquet")


def draw_all(v: monitor_report.View) -> None:
    for draw in (monitor_report.score_figure, monitor_report.ewma_figure, monitor_report.rate_figure):
        draw(v).savefig(io.BytesIO(), format="png", dpi=110)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(ws: Workspace, hours: int, rate: float, repeats: int) -> dict:
    shutil.rmtree(ws.predictions_dir, ignore_errors=True)
    shutil.rmtree(ws.alarms_dir, ignore_errors=True)
    rng, per_hour = np.random.default_rng(0), int(rate * 3600)
    for h in range(hours - 1):  # the line's ended hours, each checked (and folded in) as a replica would
        write_hour(ws, h, per_hour, rate, rng)
        monitor.check_new_alarms(ws, now=START + timedelta(hours=h + 1, minutes=6))
    write_hour(ws, hours - 1, per_hour // 2, rate, rng)  # the open hour, half way
    rows, end = per_hour * (hours - 1) + per_hour // 2, START + timedelta(hours=hours - 1, minutes=30)
    incremental = [timed(lambda: monitor.check_new_alarms(ws, now=end))[0] for _ in range(repeats)]
    since = end - timedelta(hours=24)
    window = [timed(lambda: monitor.window_chart(ws, since=since))[0] for _ in range(repeats)]
    everything = [timed(lambda: monitor.line_chart(ws))[0] for _ in range(repeats)]
    v = monitor_report.view(ws, since=since, chart=monitor.window_chart(ws, since=since))
    thinned = [timed(lambda: draw_all(v))[0] for _ in range(repeats)]
    kept, monitor_report.MAX_POINTS = monitor_report.MAX_POINTS, 10**9
    try:
        every_point = [timed(lambda: draw_all(v))[0] for _ in range(repeats)]
    finally:
        monitor_report.MAX_POINTS = kept
    shutil.rmtree(ws.alarms_dir)
    whole = [timed(lambda: monitor.check_alarms(ws, now=end))[0] for _ in range(repeats)]
    return {"hours": hours, "rows": rows, "whole_s": statistics.median(whole),
            "incremental_s": statistics.median(incremental),
            "ratio": statistics.median(whole) / statistics.median(incremental),
            "chart_whole_s": statistics.median(everything), "chart_24h_s": statistics.median(window),
            "figures_24h_s": statistics.median(thinned), "figures_24h_every_point_s": statistics.median(every_point),
            "alarms": len(monitor.read_alarms(ws)),
            "runs": {"whole": whole, "incremental": incremental, "chart_whole": everything, "chart_24h": window,
                     "figures_24h": thinned, "figures_24h_every_point": every_point}}


def alarm_files(ws: Workspace, files: int, repeats: int) -> dict:
    """`files` alarm files of one alarm each; read_alarms before and after merge_alarm_files."""
    shutil.rmtree(ws.alarms_dir, ignore_errors=True)
    ws.alarms_dir.mkdir(parents=True)
    for i in range(files):
        t = START + timedelta(seconds=30 * i)
        row = {"id": f"{i:016x}", "kind": "drift", "direction": "up", "station": "cam-1", "round": 0,
               "model": "rounds/r000/model", "ts": t, "image_id": f"{i:012d}", "statistic": 0.7, "limit": 0.6,
               "n": i, "detail": "synthetic", "detected_at": t}
        pq.write_table(pa.Table.from_pylist([row], schema=monitor.ALARM_SCHEMA),
                       ws.alarms_dir / f"a-{t:%Y%m%dT%H%M%S%f}-{i:08x}.parquet")
    unmerged = [timed(lambda: monitor.read_alarms(ws))[0] for _ in range(repeats)]
    merge_s, _ = timed(lambda: monitor.merge_alarm_files(ws))
    merged = [timed(lambda: monitor.read_alarms(ws))[0] for _ in range(repeats)]
    assert len(monitor.read_alarms(ws)) == files
    return {"files": files, "read_unmerged_s": statistics.median(unmerged), "merge_s": merge_s,
            "read_merged_s": statistics.median(merged), "files_after": len(list(ws.alarms_dir.glob("a-*.parquet"))),
            "runs": {"unmerged": unmerged, "merged": merged}}


def markdown(doc: dict) -> str:
    lines = ["# The replica's alarm check as the log grows (`python bench/alarm_check.py`)", "",
             f"Machine: {doc['machine']}  ", f"Code: {doc['commit']}, {doc['wall_s']:.0f} s. One station at "
             f"{doc['rate']:g} images/s (synthetic in-control scores, compacted hour files); medians of "
             f"{doc['repeats']}.", "",
             "| line time | rows | alarms | check: whole log | check: going on | ratio | page chart: everything | "
             "page chart: last 24 h | its figures: every point | thinned |", "|---" * 10 + "|"]
    for r in doc["sizes"]:
        lines.append(f"| {r['hours']} h | {r['rows']:,} | {r['alarms']} | {r['whole_s']:.3f} s | "
                     f"{r['incremental_s']:.3f} s | {r['ratio']:.1f}x | {r['chart_whole_s']:.3f} s | "
                     f"{r['chart_24h_s']:.3f} s | {r['figures_24h_every_point_s']:.2f} s | "
                     f"{r['figures_24h_s']:.2f} s |")
    a = doc["alarm_files"]
    lines += ["", f"Reading the recorded alarms from {a['files']:,} alarm files of one alarm each: "
              f"**{a['read_unmerged_s']:.3f} s**; merged into {a['files_after']} file(s) ({a['merge_s']:.2f} s, "
              f"once): **{a['read_merged_s']:.3f} s**."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=int, nargs="+", default=[1, 6, 24, 72])
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--alarm-files", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(make_workspace(Path(tmp), 32)[0])
        sizes = []
        for hours in args.hours:
            sizes.append(measure(ws, hours, args.rate, args.repeats))
            print(json.dumps({k: v for k, v in sizes[-1].items() if k != "runs"}), flush=True)
        files = alarm_files(ws, args.alarm_files, args.repeats)
    doc = {"machine": machine(), "commit": COMMIT, "rate": args.rate, "repeats": args.repeats,
           "wall_s": time.perf_counter() - t0, "sizes": sizes,
           "alarm_files": files}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alarm_check.json").write_text(json.dumps(doc, indent=1))
    (args.out / "alarm_check.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

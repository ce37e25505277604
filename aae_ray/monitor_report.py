"""The monitor's figures and numbers: drawn once here for the monitor page and for `aae-ray monitor --report DIR`
(the same PNGs and a JSON of what they show, for a person without a browser).

How to read them:
- *score*: each served image's primary score in arrival order, a station a colour; the dashed line is the centre
  (the median score of the answering model's calibration normals), the solid one its limit; points over the limit
  are the images the line was told are anomalies (marked x), vertical lines the promotions (a new round answers).
- *EWMA*: the exponentially weighted average of the images' normal scores (0 while in control, 1 = a shift of one
  standard deviation), with the limits designed for the stated in-control run length; a red mark is a drift alarm.
- *rate*: images over the limit per hour against alpha's expectation and its binomial band; a bar above the band
  is more defects (or false alarms) than the limit allows.

Object-oriented matplotlib (a `Figure`, no pyplot): Streamlit runs each session in its own thread, and pyplot's
global state is not safe across threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from aae_ray import monitor
from aae_ray.atomic import write_text
from aae_ray.workspace import Workspace


@dataclass(frozen=True)
class View:
    """What a person looks at: some stations over a time window, with the alarms that fall in it."""

    chart: monitor.LineChart
    streams: dict[str, monitor.Stream]  # the chosen stations, cut to the window
    alarms: list[dict[str, Any]]  # recorded alarms of those stations in the window, newest first
    level: float  # the rate band's confidence

    @property
    def n(self) -> int:
        return sum(len(s) for s in self.streams.values())


def view(ws: Workspace, settings: monitor.MonitorSettings | None = None, *, stations: list[str] | None = None,
         since: datetime | None = None, until: datetime | None = None,
         chart: monitor.LineChart | None = None) -> View:
    """`chart`: the log's chart for these settings from `since` on at least, where the caller has it."""
    settings = settings or monitor.MonitorSettings()
    chart = chart or monitor.window_chart(ws, settings, since)
    chosen = {k: s.between(since, until) for k, s in chart.streams.items() if not stations or k in stations}
    alarms = [a for a in monitor.read_alarms(ws) if a["station"] in chosen
              and (since is None or a["ts"] >= since) and (until is None or a["ts"] <= until)]
    return View(chart, chosen, alarms, settings.band_level)


MAX_POINTS = 4000  # drawn a stream and figure (read at each call): a day of a 10 images/s line is 864,000


def _times(s: monitor.Stream, idx: np.ndarray | None = None) -> np.ndarray:
    ts = s.ts if idx is None else s.ts[idx]
    return ts.astype("datetime64[ms]").astype(datetime)


def shown(anomaly: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the images over the limit, the others) a score figure draws, as indices: all where they fit in `n`; else
    every image over the limit where they are a quarter of `n` or fewer (each is one a person looks for) and
    evenly spaced others to fill, or, with more over the limit, `n` evenly spaced images of either kind."""
    n = n or MAX_POINTS
    over, other = np.flatnonzero(anomaly), np.flatnonzero(~anomaly)
    if len(over) + len(other) <= n:
        return over, other
    if len(over) <= n // 4:
        return over, _spaced(other, n - len(over))
    every = _spaced(np.arange(len(anomaly)), n)
    return every[anomaly[every]], every[~anomaly[every]]


def _spaced(idx: np.ndarray, n: int) -> np.ndarray:
    return idx if len(idx) <= n else idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


def envelope(y: np.ndarray, n: int | None = None) -> np.ndarray:
    """The indices of a line's points a figure draws: all where they fit in `n`, else the lowest and the highest
    of each of n/2 stretches, in order, so the drawn line still reaches every excursion."""
    n = n or MAX_POINTS
    if len(y) <= n:
        return np.arange(len(y))
    edges = np.linspace(0, len(y), n // 2 + 1).astype(int)
    lo = np.minimum.reduceat(y, edges[:-1])
    hi = np.maximum.reduceat(y, edges[:-1])
    out = []
    for a, b, low, high in zip(edges[:-1], edges[1:], lo, hi, strict=True):
        stretch = y[a:b]
        out += [a + int(np.argmax(stretch == low)), a + int(np.argmax(stretch == high))]
    return np.unique(out)


def _steps(y: np.ndarray) -> np.ndarray:
    """The indices where a step line (a model's limit or centre) changes, and its last: all a step draw needs."""
    if not len(y):
        return np.arange(0)
    return np.unique(np.r_[0, np.flatnonzero(y[1:] != y[:-1]) + 1, len(y) - 1])


def score_figure(v: View) -> Figure:
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.subplots()
    notes = []
    for name, s in v.streams.items():
        over, other = shown(s.anomaly)
        if len(over) + len(other) < len(s):  # say how it was thinned: the eye reads the share of x's
            n_over = int(s.anomaly.sum())
            notes.append(f"{name}: " + (f"all {n_over:,} over the limit and {len(other):,} of {len(s) - n_over:,} "
                                       f"others" if len(over) == n_over else f"{len(over) + len(other):,} of "
                                       f"{len(s):,}") + " drawn, evenly spaced")
        ax.scatter(_times(s, other), s.score[other], s=6, label=name)
        ax.scatter(_times(s, over), s.score[over], s=28, marker="x", color="crimson")
        for line, style in ((s.threshold, {"color": "black"}), (s.centre, {"color": "gray", "ls": "--"})):
            at = _steps(line)
            ax.step(_times(s, at), line[at], where="post", lw=1, **style)
    _promotions(ax, v)
    ax.set(title="Primary score of served images (x: over the limit)", ylabel="score")
    if notes:
        ax.annotate("; ".join(notes), (0.0, -0.2), xycoords="axes fraction", fontsize=7, color="dimgray",
                    va="top")
    _legend(ax, v)
    return fig


def ewma_figure(v: View) -> Figure:
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.subplots()
    limit = v.chart.design.limit
    for name, s in v.streams.items():
        at = envelope(s.ewma)  # a long window: each stretch's lowest and highest, so no excursion is lost
        ax.plot(_times(s, at), s.ewma[at], lw=1, label=name)
    drift = [a for a in v.alarms if a["kind"] == "drift"]
    if drift:  # one scatter: a busy line's day holds over a thousand alarms, and a call each costs seconds
        ax.scatter([a["ts"].replace(tzinfo=None) for a in drift], [a["statistic"] for a in drift], color="red",
                   s=40, zorder=3)
    for y in (limit, -limit):
        ax.axhline(y, color="black", lw=1)
    ax.axhline(0, color="gray", lw=1, ls="--")
    _promotions(ax, v)
    d = v.chart.design
    ax.set(title=f"EWMA of the normal scores (lam {d.lam:g}, L {d.L:.3f}: in-control ARL {d.arl0:g} images)",
           ylabel="EWMA")
    _legend(ax, v)
    return fig


def rate_figure(v: View) -> Figure:
    fig = Figure(figsize=(10, 2.8), layout="constrained")
    ax = fig.subplots()
    rows = hourly(v)
    if rows:
        x = np.arange(len(rows))
        ax.bar(x, [r["over"] for r in rows], color=["crimson" if r["outside"] else "steelblue" for r in rows])
        ax.errorbar(x, [r["expected"] for r in rows], yerr=[[r["expected"] - r["low"] for r in rows],
                                                             [r["high"] - r["expected"] for r in rows]],
                    fmt="_", color="black", capsize=4, label=f"alpha's expectation, {v.level:.0%} band")
        ax.set_xticks(x, [f"{r['hour'][5:13]}h\n{r['station']}" for r in rows], fontsize=7)
        ax.legend(fontsize=8)
    ax.set(title="Images over the limit per hour", ylabel="images")
    return fig


def hourly(v: View) -> list[dict[str, Any]]:
    sub = monitor.LineChart(v.chart.design, v.streams)
    return [{"hour": h.isoformat(), "station": s.station, "n": b.n, "over": b.over, "expected": b.expected,
             "low": b.low, "high": b.high, "outside": b.outside} for h, s, _, b in monitor.hourly_rates(sub, v.level)]


def _promotions(ax, v: View) -> None:
    for ts, station, rnd in v.chart.promotions:
        s = v.streams.get(station)
        if s is not None and len(s) and s.ts[0] <= np.datetime64(ts.replace(tzinfo=None), "us") <= s.ts[-1]:
            ax.axvline(ts.replace(tzinfo=None), color="green", lw=1, alpha=0.6)
            ax.annotate(f"r{rnd}", (ts.replace(tzinfo=None), 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color="green", va="top")


def _legend(ax, v: View) -> None:
    if len(v.streams) > 1:
        ax.legend(fontsize=7, markerscale=2, loc="upper left")


def numbers(v: View) -> dict[str, Any]:
    """What the figures show, as numbers."""
    d = v.chart.design
    return {"design": d.to_dict() | {"arl_at_1_sigma": d.arl(1.0)}, "images": v.n,
            "stations": {k: {"images": len(s), "over_limit": int(s.anomaly.sum()),
                             "ewma_last": float(s.ewma[-1]) if len(s) else None,
                             "first": _iso(s, 0), "last": _iso(s, -1)} for k, s in v.streams.items()},
            "hours": hourly(v), "promotions": [{"ts": t.isoformat(), "station": st, "round": r}
                                               for t, st, r in v.chart.promotions if st in v.streams],
            "alarms": [{**a, "ts": a["ts"].isoformat(), "detected_at": a["detected_at"].isoformat(),
                        "text": monitor.describe_alarm(a)} for a in v.alarms]}


def _iso(s: monitor.Stream, i: int) -> str | None:
    return monitor.to_datetime(s.ts[i]).isoformat() if len(s) else None


def write_report(ws: Workspace, out: Path, settings: monitor.MonitorSettings | None = None, **window) -> dict:
    """Check for new alarms, then write score.png, ewma.png, rate.png and monitor.json into `out`. `window`:
    view's stations, since and until."""
    settings = settings or monitor.MonitorSettings()
    chart = monitor.window_chart(ws, settings, window.get("since"))  # read once, for the check and the figures
    new = monitor.check_window(ws, settings, chart, window.get("since"))
    v = view(ws, settings, chart=chart, **window)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in (("score", score_figure), ("ewma", ewma_figure), ("rate", rate_figure)):
        draw(v).savefig(out / f"{name}.png", dpi=110)
    data = numbers(v) | {"workspace": str(ws.root), "written_at": datetime.now(UTC).isoformat(),
                         "new_alarms": len(new)}
    write_text(out / "monitor.json", json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    return data

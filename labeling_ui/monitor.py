"""The line monitor page (DESIGN.md `aae-ray monitor`): the served images as control charts, their drift alarms,
and a button that sends an alarm's image to the labeling queue.

    streamlit run labeling_ui/monitor.py -- --workspace WS      # what `aae-ray monitor WS --port P` runs

Thin by design: the charts' numbers come from `aae_ray.monitor` (the prediction log as streams, EWMA, alarms),
their figures from `aae_ray.monitor_report` (the same PNGs `aae-ray monitor --report` writes), the heat map from
the answering round's detector. Every load checks the log for new alarms and records them in WS/alarms/; a window
shorter than "everything" is read from the checkpoint before it (monitor.window_chart), not from the first row.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import streamlit as st

from aae_ray import artifacts, monitor, monitor_report
from aae_ray.data.images import decode_image, to_model_input
from aae_ray.workspace import Workspace, WorkspaceError
from labeling_ui.views import heat_overlay, script_arg, upscale

WINDOWS = {"everything": None, "last hour": timedelta(hours=1), "last 24 hours": timedelta(days=1),
           "last 7 days": timedelta(days=7)}
DEFAULT_WINDOW = "last 24 hours"  # "everything" reads the whole log: seconds once a line has run for days
ALARMS_SHOWN = 10
THUMB_PX = 128


@st.cache_resource(show_spinner="Loading the model ...")
def load_detector(model_dir: str, stamp: float):  # stamp: re-load when the artifact is rewritten
    return artifacts.load(Path(model_dir))


def main() -> None:
    st.set_page_config(page_title="aae-ray line monitor", layout="wide")
    root = script_arg(sys.argv[1:], "workspace")
    try:
        ws = Workspace.open(root or "")
    except WorkspaceError as exc:
        st.error(f"{exc}. Start the page with `aae-ray monitor WS`.")
        return
    st.title("Line monitor")
    started = monitor.MonitorSettings(lam=float(script_arg(sys.argv[1:], "lam", "0.1")),
                                      arl0=float(script_arg(sys.argv[1:], "arl0", "500")))
    settings = design_sidebar(started)
    window = st.sidebar.selectbox("Time", list(WINDOWS), index=list(WINDOWS).index(DEFAULT_WINDOW))
    since = datetime.now(UTC) - WINDOWS[window] if WINDOWS[window] else None
    chart = monitor.window_chart(ws, settings, since)  # from the window's checkpoint: the log before it unread
    # Alarms are recorded with the design the page was started with, not the sidebar's what-if one.
    new = monitor.check_window(ws, started, chart, since) if settings == started else monitor.check_new_alarms(
        ws, started)
    if not chart.streams and not monitor.has_log(ws):
        st.info(f"Nothing served yet: `aae-ray serve {ws.root}` logs every answer to {ws.predictions_dir}.")
        return
    stations = st.sidebar.multiselect("Stations", list(chart.streams), default=list(chart.streams))
    v = monitor_report.view(ws, settings, stations=stations, since=since, chart=chart)
    if not v.n:
        st.info(f"No image served in the {window}: choose a longer time in the sidebar.")
        return
    if new:
        st.warning(f"{len(new)} new alarm(s): " + "; ".join(monitor.describe_alarm(a) for a in new[:3]))
    headline(v)
    for draw in (monitor_report.score_figure, monitor_report.ewma_figure, monitor_report.rate_figure):
        st.pyplot(draw(v))
    with st.expander("Images over the limit per hour"):
        st.dataframe(monitor_report.hourly(v), hide_index=True)
    alarms_panel(ws, v)


def design_sidebar(started: monitor.MonitorSettings) -> monitor.MonitorSettings:
    sb = st.sidebar
    sb.markdown("**Drift chart (EWMA)**")
    lam = sb.number_input("Weight of the newest image (lambda)", 0.01, 1.0, started.lam, 0.01, format="%.2f")
    arl0 = sb.number_input("Images between false alarms (in-control ARL)", 10, 1_000_000, int(started.arl0), 50)
    settings = monitor.MonitorSettings(lam=float(lam), arl0=float(arl0))
    d = settings.design()
    sb.caption(f"Limit ±{d.limit:.3f} (L = {d.L:.3f}); a shift of one standard deviation is flagged after "
               f"{d.arl(1.0):.1f} images on average.")
    if settings != started:
        sb.caption(f"Alarms are recorded with the design the page was started with (lambda {started.lam:g}, "
                   f"ARL {started.arl0:g}: `aae-ray monitor --lam --arl0`); these values redraw the charts only.")
    sb.button("Refresh")  # a click reruns the page: new log rows, new alarms
    return settings


def headline(v: monitor_report.View) -> None:
    cols = st.columns(4)
    cols[0].metric("Served images", f"{v.n:,}")
    cols[1].metric("Over the limit", f"{sum(int(s.anomaly.sum()) for s in v.streams.values()):,}")
    cols[2].metric("Drift alarms", sum(a["kind"] == "drift" for a in v.alarms))
    cols[3].metric("Rate alarms", sum(a["kind"] == "rate" for a in v.alarms))


def alarms_panel(ws: Workspace, v: monitor_report.View) -> None:
    st.subheader("Latest alarms")
    if not v.alarms:
        st.caption("No alarm in this window.")
        return
    for a in v.alarms[:ALARMS_SHOWN]:
        with st.container(border=True):
            st.markdown(f"**{monitor.describe_alarm(a)}**  \n{a['detail']}; {a['n']} images since the chart started")
            alarm_image(ws, a)


def alarm_image(ws: Workspace, a: dict) -> None:
    data = monitor.logged_image(ws, a["image_id"], at=a["ts"])
    if data is None:
        st.caption("The log kept no bytes for this image (`aae-ray serve --log-images all` or `--log-sample` "
                   "keeps them for images that are not flagged).")
        return
    cols = st.columns([1, 1, 3])
    cols[0].image(upscale(decode_image(data), THUMB_PX), caption="the image")
    folder = ws.model_dir(a["round"])
    if (folder / "config.json").exists():
        det = load_detector(str(folder), (folder / "score.json").stat().st_mtime)
        x = to_model_input([data], det.config.input_size)
        amap = det.score(x).maps[0]
        cols[1].image(upscale(heat_overlay(x[0, 0], amap), THUMB_PX), caption=f"heat map ({det.map_label})")
    else:
        cols[1].caption(f"No heat map: round {a['round']}'s model is no longer in the workspace.")
    if cols[2].button("Send to labeling", key=f"send-{a['id']}"):
        try:
            cols[2].success(monitor.send_to_labeling(ws, a["image_id"], at=a["ts"]))
        except ValueError as exc:
            cols[2].error(str(exc))


main()

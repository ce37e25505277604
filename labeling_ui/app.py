"""The labeling page (DESIGN.md "Label"): a person confirms the queue's highest-priority images as defect or normal.

    streamlit run labeling_ui/app.py -- --workspace WS      # what `aae-ray label WS --port P` runs

Thin by design: the queue comes from `aae_ray.rounds.latest_queue`, the model from `aae_ray.artifacts.load`, and
every label is read and written through `aae_ray.labels` (append-only events; an undo is a new event). The current
labels are re-read on every rerun, so an image another labeler answered drops out of this page on its next refresh.
Images the line sent (`aae-ray ingest`, source `line:<station>`) come first while the queue holds any, and the
sidebar can keep one station's (`aae_ray.rounds.for_labeling`).
The workspace comes from `--workspace WS` after `--`, else from the environment variable AAE_RAY_WORKSPACE.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import streamlit as st
import streamlit.components.v1 as components

from aae_ray import artifacts, labels
from aae_ray.data.images import decode_image, to_model_input
from aae_ray.rounds import for_labeling, latest_queue, line_stations
from aae_ray.workspace import Workspace, WorkspaceError
from labeling_ui.views import heat_overlay, script_arg, to_uint8, upscale

ENV_VAR = "AAE_RAY_WORKSPACE"
GRID_SIZE = 12
CARD_PX = 224  # card images are upscaled (nearest neighbour) to at least this many pixels a side
THUMB_PX = 96
MODEL_VIEW_PX = 128  # the model's input, its reconstruction and the heat map beside the full image
HISTORY_ROWS = 50
ALL_STATIONS = "all stations"


# --- pure helpers (no Streamlit) --------------------------------------------------------------------------------


def workspace_arg(argv: list[str], environ: dict[str, str]) -> str | None:
    """`--workspace WS` or `--workspace=WS` from the script's arguments, else the environment variable."""
    return script_arg(argv, "workspace") or environ.get(ENV_VAR) or None


def score_metric(label: str, item: dict) -> tuple[str, str]:
    """The queue ranks by the model's primary score, shown under the detector's name for it (`score_label`:
    T², local T², combined T², or a family's own score)."""
    return label, f"{item.get('score', item['t2']):.4g}"


def score_caption(label: str, item: dict) -> str:
    """The grid's short form of score_metric."""
    return f"{label} {item.get('score', item['t2']):.3g}"


def why_queued(label: str, item: dict, threshold: float) -> str:
    """One line on why the image is here: its score against the threshold, and what its p-value means."""
    score, p = item.get("score", item["t2"]), item["p_value"]
    side = "above" if score > threshold else "below"
    return (f"Queued at rank {item['rank']}: its {label} {score:.4g} is **{side}** the threshold {threshold:.4g}; "
            f"p = {p:.3g}, i.e. about {p:.1%} of images known to be normal score this high.")


def from_the_line(station: str | None) -> str:
    """What a card or a thumbnail says of an image the line sent (aae-ray ingest); empty for any other."""
    return f"from the line (station {station})" if station else ""


# --- cached loading ---------------------------------------------------------------------------------------------


def _stamp(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_resource(show_spinner="Loading the model ...")
def load_detector(model_dir: str, stamp: float):  # stamp: re-load when the artifact is rewritten
    return artifacts.load(Path(model_dir))


def current_detector(ws: Workspace):
    model_dir = ws.current_model_dir()
    # score.json too: `aae-ray recalibrate` rewrites only the limit
    return load_detector(str(model_dir), max(_stamp(model_dir / "config.json"), _stamp(model_dir / "score.json")))


@st.cache_resource(show_spinner="Reading the images ...")
def load_image_bytes(images_path: str, stamp: float) -> dict[str, bytes]:
    table = Workspace(Path(images_path).parent.parent).images().select(["id", "image"])
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))


@st.cache_resource(show_spinner=False)
def load_line_stations(images_path: str, stamp: float) -> dict[str, str]:
    return line_stations(Workspace(Path(images_path).parent.parent))


# --- callbacks: every label change happens here, before the page is drawn ---------------------------------------


def _mine(labeler: str) -> list[str]:
    return st.session_state.setdefault("last_ids", {}).setdefault(labeler, [])


def answer(labels_dir: str, item: dict, label: str, labeler: str, round_no: int, model: str | None) -> None:
    labels.append(Path(labels_dir), [labels.LabelEvent(item["id"], label, labeler, round_no, item["t2"], model)])
    _mine(labeler).append(item["id"])
    st.session_state["flash"] = f"{item['id']} → {label}"


def undo_last(labels_dir: str, labeler: str, round_no: int) -> None:
    mine = _mine(labeler)
    if not mine:
        return
    id_ = mine.pop()
    latest = labels.history(Path(labels_dir), id=id_, limit=1)
    if latest and latest[0]["labeler"] != labeler:
        st.session_state["flash"] = (f"not undone: {id_} was labeled since by {latest[0]['labeler']} "
                                     f"({latest[0]['label']})")
        return
    event = labels.undo(Path(labels_dir), id_, labeler, round_no)
    restored = "no label" if event is None or event.label == labels.UNSET else event.label
    st.session_state["flash"] = f"undone: {id_} is back to {restored}"


def save_grid(labels_dir: str, page: list[dict], labeler: str, round_no: int, model: str | None) -> None:
    events = [labels.LabelEvent(r["id"], "defect" if st.session_state.get(f"defect_{r['id']}") else "normal",
                                labeler, round_no, r["t2"], model) for r in page]
    labels.append(Path(labels_dir), events)
    _mine(labeler).extend(e.id for e in events)
    for r in page:
        st.session_state.pop(f"defect_{r['id']}", None)
    n_def = sum(e.label == "defect" for e in events)
    st.session_state["flash"] = f"saved {len(events)} labels: {n_def} defect, {len(events) - n_def} normal"


def remember_labeler() -> None:
    """Keep the name in the page's address (?labeler=...), so a reload or a bookmark brings it back; and take
    the keyboard focus off the name box, so that the next key is a shortcut (d, n, s, u), not more name."""
    name = st.session_state.get("labeler", "").strip()
    if name:
        st.query_params["labeler"] = name
        st.session_state["blur"] = True
    else:
        st.query_params.pop("labeler", None)


# Streamlit has no call to move the focus; a zero-height component (same origin as the page) can. Its
# script runs once per mount, so the key below changes with each name entered.
BLUR_SCRIPT = "<script>window.parent.document.activeElement && window.parent.document.activeElement.blur()</script>"


# --- the page ---------------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="aae-ray labeling", layout="wide")
    st.title("aae-ray labeling")
    root = workspace_arg(sys.argv[1:], dict(os.environ))
    if root is None:
        st.error(f"No workspace given: run `aae-ray label WS` (or set {ENV_VAR}).")
        return
    try:
        ws = Workspace.open(root)
        current = ws.current()
    except WorkspaceError as exc:
        st.error(str(exc))
        return

    sb = st.sidebar
    labeler = labeler_name(sb)
    if st.session_state.pop("blur", False):
        components.html(BLUR_SCRIPT, height=0)
    mode = sb.radio("Mode", ["Card", "Grid"], key="mode", horizontal=True)
    found = queue_header(sb, ws, current, root)
    if found is None:
        return
    round_no, queue = found
    try:
        done = labels.current_labels(ws.labels_dir)
    except ValueError as exc:
        st.error(str(exc))
        return
    todo = progress(sb, queue, done)
    shown, stations = line_filter(sb, ws, queue, todo)

    if not labeler:
        st.warning("Enter your name in the sidebar to start labeling.")
    flash = st.session_state.pop("flash", None)
    if flash:  # what was just recorded: at the top of the page, and as a toast that fades
        st.success(flash)
        st.toast(flash)

    model = current["model"]
    labels_dir = str(ws.labels_dir)
    if not todo:
        st.info(f"The queue of round {round_no} is done ({len(queue)} images). Run `aae-ray round {root}` to "
                f"train the next round, or `aae-ray score {root}` to re-score the pool.")
        if labeler:
            st.button("Undo", key="undo", shortcut="u", disabled=not _mine(labeler),
                      on_click=undo_last, args=(labels_dir, labeler, round_no))
    elif not shown:
        st.info(f"No unlabeled images from station {st.session_state.get('station')} left in this queue: pick "
                f"another station, or {ALL_STATIONS}, in the sidebar.")
    elif mode == "Card":
        card(ws, shown[0], len(queue), labeler, round_no, model, labels_dir, stations.get(shown[0]["id"]))
    else:
        grid(ws, shown[:GRID_SIZE], labeler, round_no, model, labels_dir, stations)
    history_panel(ws)


def queue_header(sb, ws: Workspace, current: dict | None, root: str) -> tuple[int, list[dict]] | None:
    """The model and the latest queue in the sidebar; (round, queue rows in rank order), or None with what to
    run first when there is no promoted model or no queue yet."""
    if current is None:
        sb.markdown("**Model:** none promoted")
        st.info(f"No promoted model yet: run `aae-ray tune {root}` (or `aae-ray train {root}`), "
                f"then `aae-ray score {root}`.")
        return None
    sb.markdown(f"**Model:** `{current['model']}` (round {current['round']})")
    found = latest_queue(ws)
    if found is None:
        st.info(f"No labeling queue yet: run `aae-ray score {root}` to score the pool with the promoted model.")
        return None
    round_no, queue_path = found
    sb.markdown(f"**Queue:** round {round_no} (`{queue_path.relative_to(ws.root)}`), in rank order — "
                "the queue's policy (e.g. highest T² first) was fixed when it was scored")
    if round_no != current["round"]:
        sb.warning(f"The queue is from round {round_no}, the promoted model from round {current['round']}: "
                   f"run `aae-ray score {root}` for a fresh queue.")
    return round_no, sorted(pq.read_table(queue_path).to_pylist(), key=lambda r: r["rank"])


def progress(sb, queue: list[dict], done: dict[str, str]) -> list[dict]:
    """The queue's progress in the sidebar; the rows nobody has labeled yet, in rank order."""
    todo = [r for r in queue if r["id"] not in done]
    n_labeled = len(queue) - len(todo)
    sb.markdown("**Progress (this round's queue)**")
    c1, c2, c3 = sb.columns(3)
    c1.metric("Labeled", n_labeled)
    c2.metric("Defects", sum(done.get(r["id"]) == "defect" for r in queue))
    c3.metric("Left", len(todo))
    sb.progress(n_labeled / len(queue) if queue else 1.0)
    return todo


def line_filter(sb, ws: Workspace, queue: list[dict], todo: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The sidebar's "From the line first" (on by default) and station choice, shown while the queue holds images
    the line sent; (the to-do rows in the order and selection they ask for, {id: station} of the line images)."""
    stations = load_line_stations(str(ws.images_path), _stamp(ws.images_path))
    present = sorted({stations[r["id"]] for r in queue if r["id"] in stations})
    if not present:  # nothing from the line in this queue: nothing to order or filter
        return todo, stations
    first = sb.checkbox("From the line first", value=True, key="line_first",
                        help="the images the line sent (aae-ray ingest, round --ingest) before the others, each "
                             "group in rank order")
    options = [ALL_STATIONS, *present]
    if st.session_state.get("station") not in options:  # a station whose images left the queue
        st.session_state["station"] = ALL_STATIONS
    station = sb.selectbox("Station", options, key="station", help="only the line images of one station")
    return for_labeling(todo, stations, line_first=first,
                        station=None if station == ALL_STATIONS else station), stations


def labeler_name(sb) -> str:
    if "labeler" not in st.session_state:  # first run of this browser session: the address may remember a name
        st.session_state["labeler"] = st.query_params.get("labeler", "")
    return sb.text_input("Your name", key="labeler", placeholder="who is labeling",
                         on_change=remember_labeler).strip()


def card(ws: Workspace, item: dict, n_queue: int, labeler: str, round_no: int, model: str, labels_dir: str,
         station: str | None = None) -> None:
    det = current_detector(ws)
    data = load_image_bytes(str(ws.images_path), _stamp(ws.images_path))[item["id"]]
    original = decode_image(data)
    x = to_model_input([data], det.config.input_size)
    s = det.score(x)  # one pass: the reconstruction and the anomaly map (local T² where the model has one)
    recon, amap = s.x_hat[0, 0], s.maps[0]
    line = f"{from_the_line(station)} · " if station else ""
    st.subheader(f"Rank {item['rank']} of {n_queue} · {line}`{item['id']}`")
    h, w = original.shape[:2]
    side = det.config.input_size
    big, rest = st.columns([2, 3])
    # The image as it was imported, at its own resolution (small ones enlarged): a small defect is judged here.
    big.image(upscale(original, CARD_PX), caption=f"image ({w}×{h} px)")
    cols = rest.columns(3)
    cols[0].image(upscale(to_uint8(x[0, 0]), MODEL_VIEW_PX), caption=f"what the model sees ({side}×{side})")
    cols[1].image(upscale(to_uint8(recon), MODEL_VIEW_PX), caption="its reconstruction")
    cols[2].image(upscale(heat_overlay(x[0, 0], amap), MODEL_VIEW_PX), caption=f"anomaly map (red: {det.map_label})")
    rest.markdown(why_queued(det.score_label, item, det.threshold_))
    m = rest.columns(4)
    m[0].metric(*score_metric(det.score_label, item))
    m[1].metric("Threshold", f"{det.threshold_:.4g}")
    m[2].metric("p-value", f"{item['p_value']:.3g}")
    m[3].metric("Rank", item["rank"])
    off = not labeler
    b = st.columns(4)
    for col, label, key in ((b[0], "defect", "d"), (b[1], "normal", "n"), (b[2], "skip", "s")):
        col.button(f"{label.capitalize()} ({key.upper()})", key=label, shortcut=key, disabled=off,
                   type="primary" if label == "defect" else "secondary", width="stretch",
                   on_click=answer, args=(labels_dir, item, label, labeler, round_no, model))
    b[3].button("Undo (U)", key="undo", shortcut="u", disabled=off or not _mine(labeler),
                width="stretch", on_click=undo_last, args=(labels_dir, labeler, round_no))


def grid(ws: Workspace, page: list[dict], labeler: str, round_no: int, model: str, labels_dir: str,
         stations: dict[str, str] | None = None) -> None:
    images = load_image_bytes(str(ws.images_path), _stamp(ws.images_path))
    label = current_detector(ws).score_label
    st.subheader(f"Next {len(page)} unlabeled images, highest priority first")
    cols = st.columns(4)
    for i, r in enumerate(page):
        with cols[i % 4]:
            st.image(upscale(decode_image(images[r["id"]]), THUMB_PX),
                     caption=" · ".join(filter(None, [f"#{r['rank']}", score_caption(label, r),
                                                      from_the_line((stations or {}).get(r["id"]))])))
            st.checkbox("defect", key=f"defect_{r['id']}", disabled=not labeler)
    b1, b2 = st.columns(2)
    b1.button("Save: ticked = defect, the rest normal", key="save_grid", type="primary", disabled=not labeler,
              on_click=save_grid, args=(labels_dir, page, labeler, round_no, model))
    b2.button("Undo last label (U)", key="undo", shortcut="u", disabled=not labeler or not _mine(labeler),
              on_click=undo_last, args=(labels_dir, labeler, round_no))


def history_panel(ws: Workspace) -> None:
    with st.expander("History"):
        rows = labels.history(ws.labels_dir, limit=HISTORY_ROWS)
        if rows:
            st.dataframe([{**r, "ts": r["ts"].isoformat(timespec="seconds")} for r in rows], hide_index=True)
        else:
            st.caption("No labels yet.")
        # A callable: the CSV is built when the button is clicked, not on every rerun.
        st.download_button("Download all labels (CSV)", lambda: labels.csv_bytes(ws.labels_dir),
                           file_name="labels.csv", mime="text/csv", key="download_csv")


main()

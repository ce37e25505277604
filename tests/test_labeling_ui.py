"""The Streamlit labeling page (labeling_ui/app.py), driven headless with streamlit.testing.v1.AppTest."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_SET, run_cli
from test_ingest import log_line

from aae_ray import artifacts, importing, labels, rounds
from aae_ray.prediction_log import content_id
from aae_ray.workspace import Workspace

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "labeling_ui" / "app.py")


@pytest.fixture
def lab_ws(scored_copy_path, monkeypatch) -> Path:
    monkeypatch.setenv("AAE_RAY_WORKSPACE", str(scored_copy_path))
    return scored_copy_path


def queue_ids(ws: Path) -> list[str]:
    rows = pq.read_table(ws / "rounds" / "r000" / "scores.parquet").to_pylist()
    return [r["id"] for r in sorted(rows, key=lambda r: r["rank"])]


def app(name: str | None = "ann") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception, at.exception
    if name is not None:
        at.text_input(key="labeler").input(name).run()
        assert not at.exception, at.exception
    return at


def shown_id(at: AppTest) -> str:
    return at.subheader[0].value.split("`")[1]


def test_no_labeler_name_disables_labeling(lab_ws):
    at = app(name=None)
    assert at.button(key="defect").disabled and at.button(key="normal").disabled
    assert any("name" in w.value for w in at.warning)
    assert len(at.get("image")) == 4  # the image as imported, the model input, its reconstruction, the heat map


def test_defect_writes_one_event_and_moves_on(lab_ws):
    ids = queue_ids(lab_ws)
    at = app()
    assert shown_id(at) == ids[0]
    at.button(key="defect").click().run()
    assert not at.exception
    events = labels.read_events(lab_ws / "labels").to_pylist()
    assert len(events) == 1
    e = events[0]
    assert (e["id"], e["label"], e["labeler"], e["round"]) == (ids[0], "defect", "ann", 0)
    assert e["model"] == "rounds/r000/model" and e["t2"] is not None
    assert shown_id(at) == ids[1]


def test_normal_then_undo_puts_the_image_back(lab_ws):
    ids = queue_ids(lab_ws)
    at = app()
    at.button(key="normal").click().run()
    assert labels.current_labels(lab_ws / "labels") == {ids[0]: "normal"}
    assert shown_id(at) == ids[1]
    at.button(key="undo").click().run()
    assert not at.exception
    assert labels.current_labels(lab_ws / "labels") == {}
    assert labels.history(lab_ws / "labels")[0]["label"] == labels.UNSET
    assert shown_id(at) == ids[0]
    assert at.button(key="undo").disabled  # nothing of ann's left to undo


def test_skip_writes_a_skip_event(lab_ws):
    ids = queue_ids(lab_ws)
    at = app()
    at.button(key="skip").click().run()
    events = labels.read_events(lab_ws / "labels").to_pylist()
    assert [(e["id"], e["label"]) for e in events] == [(ids[0], "skip")]
    assert shown_id(at) == ids[1]


def test_grid_saves_ticked_as_defect_the_rest_normal(lab_ws):
    ids = queue_ids(lab_ws)
    assert len(ids) > 12
    at = app()
    at.radio(key="mode").set_value("Grid").run()
    assert len(at.checkbox) == 12
    at.checkbox(key=f"defect_{ids[2]}").check()
    at.checkbox(key=f"defect_{ids[5]}").check()
    at.button(key="save_grid").click().run()
    assert not at.exception
    frags = labels.fragments(lab_ws / "labels")
    assert len(frags) == 1  # one append call
    current = labels.current_labels(lab_ws / "labels")
    assert current == {id_: ("defect" if id_ in (ids[2], ids[5]) else "normal") for id_ in ids[:12]}
    assert {c.key for c in at.checkbox} == {f"defect_{i}" for i in ids[12:24]}  # the next page, none ticked
    assert not any(c.value for c in at.checkbox)


def test_image_labeled_by_another_labeler_drops_out_on_rerun(lab_ws):
    ids = queue_ids(lab_ws)
    at = app()
    assert shown_id(at) == ids[0]
    labels.append(lab_ws / "labels", [labels.LabelEvent(ids[0], "normal", "bob", 0)])
    at.run()
    assert shown_id(at) == ids[1]


def test_no_queue_says_run_score(lab_ws):
    (lab_ws / "rounds" / "r000" / "scores.parquet").unlink()
    at = app(name=None)
    assert not at.exception
    assert any("aae-ray score" in i.value for i in at.info)


def test_no_model_says_run_tune(lab_ws):
    (lab_ws / "current.json").unlink()
    at = app(name=None)
    assert any("aae-ray tune" in i.value for i in at.info)


def test_workspace_from_argv_and_history_panel(lab_ws, monkeypatch):
    """`streamlit run labeling_ui/app.py -- --workspace WS` hands the script sys.argv = [app, --workspace, WS]."""
    monkeypatch.delenv("AAE_RAY_WORKSPACE")
    monkeypatch.setattr("sys.argv", [APP, "--workspace", str(lab_ws)])
    ids = queue_ids(lab_ws)
    labels.append(lab_ws / "labels", [labels.LabelEvent(ids[0], "defect", "bob", 0)])
    at = app()
    assert shown_id(at) == ids[1]
    table = at.dataframe[0].value
    assert list(table["labeler"]) == ["bob"] and list(table["id"]) == [ids[0]]
    assert at.get("download_button")


def test_the_address_remembers_the_labeler_name(lab_ws):
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["labeler"] = "ann"
    at.run()
    assert at.text_input(key="labeler").value == "ann"
    assert not at.button(key="defect").disabled
    at.text_input(key="labeler").input("bob").run()
    assert at.query_params["labeler"] == "bob"
    at.text_input(key="labeler").input("").run()
    assert "labeler" not in at.query_params


def test_a_family_with_its_own_score_shows_that_score(ws_copy, monkeypatch):
    """A VAE's queue is ranked by its negative ELBO, not T²: the card and the grid say so."""
    assert run_cli("train", ws_copy, "--epochs", "1", *TINY_SET, "--set=family=vae", "--no-progress") == 0
    assert run_cli("score", ws_copy) == 0
    monkeypatch.setenv("AAE_RAY_WORKSPACE", str(ws_copy))
    at = app()
    first = min(pq.read_table(ws_copy / "rounds" / "r000" / "scores.parquet").to_pylist(), key=lambda r: r["rank"])
    shown = {m.label: m.value for m in at.metric}
    assert shown["vae score"] == f"{first['score']:.4g}" and "T²" not in shown
    at.radio(key="mode").set_value("Grid").run()
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert len(captions) == 12
    assert captions[0] == f"#{first['rank']} · vae score {first['score']:.3g}"


def test_the_card_draws_the_local_t2_map_and_names_the_combined_score(lab_ws):
    """The default AAE's heat map is its local T² map (issue 14): the card's third image says so, and its score
    metric is the combined T² that ranks the queue."""
    at = app()
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert captions == ["image (32×32 px)", "what the model sees (32×32)", "its reconstruction",
                        "anomaly map (red: local T²)"]
    first = min(pq.read_table(lab_ws / "rounds" / "r000" / "scores.parquet").to_pylist(), key=lambda r: r["rank"])
    shown = {m.label: m.value for m in at.metric}
    assert shown["combined T²"] == f"{first['score']:.4g}"
    threshold = artifacts.load(lab_ws / "rounds" / "r000" / "model").threshold_
    assert shown["Threshold"] == f"{threshold:.4g}" and shown["p-value"] == f"{first['p_value']:.3g}"
    why = [m.value for m in at.markdown if m.value.startswith("Queued at rank")]
    side = "above" if first["score"] > threshold else "below"
    assert why and f"is **{side}** the threshold" in why[0]


# --- images from the line (issue 17) -------------------------------------------------------------------------------


def test_for_labeling_puts_line_images_first_in_rank_order_and_keeps_one_station():
    rows = [{"id": f"i{k}", "rank": k} for k in range(1, 7)]
    stations = {"i5": "cam-2", "i2": "cam-2", "i4": "cam-1", "elsewhere": "cam-9"}
    ids = lambda out: [r["id"] for r in out]  # noqa: E731
    assert ids(rounds.for_labeling(rows, stations)) == ["i2", "i4", "i5", "i1", "i3", "i6"]
    assert ids(rounds.for_labeling(rows, stations, line_first=False)) == [f"i{k}" for k in range(1, 7)]
    assert ids(rounds.for_labeling(rows, stations, station="cam-2")) == ["i2", "i5"]
    assert ids(rounds.for_labeling(rows, stations, station="cam-9")) == []
    assert ids(rounds.for_labeling(rows, {})) == [f"i{k}" for k in range(1, 7)]
    assert rows == [{"id": f"i{k}", "rank": k} for k in range(1, 7)]  # the caller's rows untouched
    assert [rounds.line_station(s) for s in ("line:cam-1", "line:a:b/c", "synthetic", "folder", None)] == [
        "cam-1", "a:b/c", None, None, None]


def line_images_at_the_bottom(ws_root: Path) -> list[str]:
    """Two images from cam-1 and one from cam-2 ingested, queued last: only "from the line first" lifts them."""
    ws = Workspace.open(ws_root)
    queued = queue_ids(ws_root)
    data = log_line(ws, 2, flagged=set(), at=datetime.now(UTC), station="cam-1")
    data += log_line(ws, 1, flagged=set(), at=datetime.now(UTC), station="cam-2", seed=2000)
    line_ids = [content_id(d) for d in data]
    importing.line(ws_root, ids=line_ids, echo=lambda _: None)
    rounds.enqueue(ws, line_ids)
    rounds.enqueue(ws, queued)  # the imported queue back on top, in its order: the line images last
    assert queue_ids(ws_root)[-3:] == line_ids
    return line_ids


def test_line_images_come_first_and_say_so_and_the_station_box_filters(lab_ws):
    line_ids = line_images_at_the_bottom(lab_ws)
    ids = queue_ids(lab_ws)
    at = app()
    assert at.checkbox(key="line_first").value is True  # on: the queue holds line images
    assert at.selectbox(key="station").options == ["all stations", "cam-1", "cam-2"]
    assert shown_id(at) == line_ids[0] and "from the line (station cam-1)" in at.subheader[0].value
    at.checkbox(key="line_first").uncheck().run()
    assert shown_id(at) == ids[0] and "from the line" not in at.subheader[0].value
    at.selectbox(key="station").select("cam-2").run()
    assert shown_id(at) == line_ids[2] and "from the line (station cam-2)" in at.subheader[0].value
    at.button(key="defect").click().run()  # cam-2's only image answered: nothing of it left
    assert not at.exception and any("No unlabeled images from station cam-2" in i.value for i in at.info)
    at.selectbox(key="station").select("all stations").run()
    at.checkbox(key="line_first").check().run()
    at.radio(key="mode").set_value("Grid").run()
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]  # column by column (4 columns)
    line_captions = [c for c in captions if "from the line" in c]
    assert len(captions) == 12 and captions[0] in line_captions  # cam-2's is labeled: cam-1's two, then rank order
    assert len(line_captions) == 2 and all(c.endswith("· from the line (station cam-1)") for c in line_captions)
    assert {c.split(" · ")[0] for c in captions} - {c.split(" · ")[0] for c in line_captions} == {
        f"#{k}" for k in range(1, 11)}


def test_without_line_images_the_page_has_no_line_controls_and_keeps_rank_order(lab_ws):
    at = app()
    assert not [c for c in at.checkbox if c.key == "line_first"] and not at.selectbox
    assert shown_id(at) == queue_ids(lab_ws)[0] and "from the line" not in at.subheader[0].value

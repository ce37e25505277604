"""The labeling page in a real browser: `aae-ray label` on loopback, Debian's Chromium driven by Playwright.

Labels are given by the keyboard shortcuts a labeler uses (d, n, s, u), and the label store on disk is the judge.
"""

from __future__ import annotations

import re
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_SET, page_server, run_cli
from test_ingest import log_line

from aae_ray import importing, labels, rounds
from aae_ray.prediction_log import content_id
from aae_ray.workspace import Workspace

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

# Quiet offline: without these Chromium keeps trying to reach Google's hosts (ENVIRONMENT.md).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # a loaded 2-core machine runs the model and Streamlit's reruns side by side

pytestmark = pytest.mark.slow


@pytest.fixture
def lab_ws(scored_copy_path) -> Path:
    return scored_copy_path


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


def browser(playwright):
    return playwright.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"),
                                                         executable_path=str(CHROMIUM), headless=True,
                                                         args=CHROMIUM_ARGS)


def queue_ids(ws: Path) -> list[str]:
    rows = pq.read_table(ws / "rounds" / "r000" / "scores.parquet").to_pylist()
    return [r["id"] for r in sorted(rows, key=lambda r: r["rank"])]


def open_page(ctx, url: str, name: str):
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    box = page.get_by_label("Your name")
    box.fill(name)
    box.press("Enter")
    # The card is drawn before the name reaches the server; its buttons are enabled once it has.
    sync_api.expect(page.get_by_role("button", name=re.compile(r"^Defect"))).to_be_enabled(timeout=TIMEOUT_MS)
    settle(page)  # the page takes the focus off the name box itself (test_the_first_key_after_the_name_labels)
    # its script runs in a component frame, which may load after the run settles: a key pressed sooner would
    # type into the name box, as it would for a person typing faster than the page loads
    page.wait_for_function("() => document.activeElement?.tagName !== 'INPUT'", timeout=TIMEOUT_MS)
    return page


def card_id(page) -> str:
    """The id on the card now shown (its subheader reads "Rank R of N · `id`")."""
    heading = page.get_by_text(re.compile(r"^Rank \d+ of \d+")).inner_text()
    return heading.rsplit("·", 1)[1].strip().strip("`")


def settle(page) -> None:
    """Wait for the script run to finish. Streamlit draws a rerun element by element and keeps the previous run's
    elements meanwhile, marked data-stale: read before this, the card may still show the image before."""
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]') && "
                           "!document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')")


def press_and_wait(page, key: str, flash: str) -> None:
    page.keyboard.press(key)
    page.get_by_text(flash, exact=False).first.wait_for()
    settle(page)


def events_on_disk(ws: Path) -> list[tuple[str, str, str]]:
    t = labels.read_events(ws / "labels").sort_by("ts").to_pylist()
    return [(e["id"], e["label"], e["labeler"]) for e in t]


def test_defect_normal_and_undo_by_key_presses_are_exactly_the_events_on_disk(lab_ws, tmp_path, playwright):
    first, second = queue_ids(lab_ws)[:2]
    with page_server(lab_ws, tmp_path / "label.log") as url:
        ctx = browser(playwright)
        try:
            page = open_page(ctx, url, "ann")
            assert card_id(page) == first
            press_and_wait(page, "d", f"{first} → defect")
            assert card_id(page) == second
            press_and_wait(page, "n", f"{second} → normal")
            press_and_wait(page, "u", f"undone: {second} is back to no label")
            assert card_id(page) == second  # the undone image is back at the head of the queue
        finally:
            ctx.close()
    assert events_on_disk(lab_ws) == [(first, "defect", "ann"), (second, "normal", "ann"),
                                      (second, labels.UNSET, "ann")]
    assert labels.current_labels(lab_ws / "labels") == {first: "defect"}


def test_the_name_is_remembered_in_the_address_across_a_reload(lab_ws, tmp_path, playwright):
    with page_server(lab_ws, tmp_path / "label.log") as url:
        ctx = browser(playwright)
        try:
            page = open_page(ctx, url, "bob")
            page.wait_for_url(re.compile(r"labeler=bob"))
            page.reload()
            # The page is drawn in steps: wait (up to the timeout) for the box to show the remembered name.
            sync_api.expect(page.get_by_label("Your name")).to_have_value("bob", timeout=TIMEOUT_MS)
            sync_api.expect(page.get_by_role("button", name=re.compile(r"^Defect"))).to_be_enabled(
                timeout=TIMEOUT_MS)
        finally:
            ctx.close()


def label_by_keys(url: str, name: str, keys: str, confirmed: list, errors: list) -> None:
    """One labeler in a browser of their own (one Playwright per thread): a key per card, each answer checked."""
    try:
        with sync_api.sync_playwright() as p:
            ctx = browser(p)
            try:
                page = open_page(ctx, url, name)
                for key in keys:
                    shown = card_id(page)
                    label = {"d": "defect", "n": "normal", "s": "skip"}[key]
                    press_and_wait(page, key, f"{shown} → {label}")
                    confirmed.append((shown, label))
            finally:
                ctx.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the test's own thread
        errors.append(exc)


def test_two_labelers_at_once_lose_nothing_and_see_each_others_answers_drop_out(lab_ws, tmp_path, playwright):
    keys = {"ann": "dndsn", "bob": "nddnd"}
    with page_server(lab_ws, tmp_path / "label.log") as url:
        confirmed: dict[str, list[tuple[str, str]]] = {name: [] for name in keys}
        errors: list[BaseException] = []
        threads = [threading.Thread(target=label_by_keys, args=(url, name, k, confirmed[name], errors))
                   for name, k in keys.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        # A fresh page shows neither labeler's answered images.
        ctx = browser(playwright)
        try:
            page = open_page(ctx, url, "cy")
            answered = {id_ for pairs in confirmed.values() for id_, _ in pairs}
            assert card_id(page) not in answered
        finally:
            ctx.close()
    on_disk = events_on_disk(lab_ws)
    assert len(on_disk) == sum(len(k) for k in keys.values())
    for name, pairs in confirmed.items():
        assert [(id_, label) for id_, label, who in on_disk if who == name] == pairs


def test_the_first_key_after_the_name_labels(lab_ws, tmp_path, playwright):
    """Typing the name and Enter leaves the focus in the name box; the page takes it off, so the labeler's
    first key press is a label, not a letter added to their name."""
    first = queue_ids(lab_ws)[0]
    with page_server(lab_ws, tmp_path / "label.log") as url:
        ctx = browser(playwright)
        try:
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            box = page.get_by_label("Your name")
            box.fill("ann")
            box.press("Enter")
            sync_api.expect(page.get_by_role("button", name=re.compile(r"^Defect"))).to_be_enabled(
                timeout=TIMEOUT_MS)
            settle(page)
            # the page itself takes the focus off the name box (no click anywhere) ...
            page.wait_for_function("() => document.activeElement?.tagName !== 'INPUT'", timeout=TIMEOUT_MS)
            press_and_wait(page, "d", f"{first} → defect")  # ... so the first key labels
            sync_api.expect(page.get_by_label("Your name")).to_have_value("ann")
        finally:
            ctx.close()
    assert events_on_disk(lab_ws) == [(first, "defect", "ann")]


def test_the_card_shows_the_image_at_its_own_resolution_and_no_developer_toolbar(tmp_path, playwright):
    """A 128-px import, a 32-px model: the card's first image is the 128-px original (not the model's 32 px
    enlarged), the model's view is beside it, and Streamlit's Deploy button and menu are not on the page."""
    ws = tmp_path / "ws"
    assert run_cli("init", ws, "--source", "synthetic", "--n-normal", "60", "--n-defect", "12", "--size", "128") == 0
    assert run_cli("train", ws, "--epochs", "1", *TINY_SET, "--no-progress") == 0
    assert run_cli("score", ws) == 0
    with page_server(ws, tmp_path / "label.log") as url:
        ctx = browser(playwright)
        try:
            page = open_page(ctx, url, "ann")
            sync_api.expect(page.get_by_text("image (128×128 px)")).to_be_visible()
            sync_api.expect(page.get_by_text("what the model sees (32×32)")).to_be_visible()
            widths = page.locator("[data-testid='stImage'] img").evaluate_all("els => els.map(e => e.naturalWidth)")
            assert widths[0] >= 128 and widths[0] % 128 == 0  # the original, enlarged by a whole factor
            assert page.get_by_text(re.compile(r"^Queued at rank 1: its combined T²")).count() == 1
            assert page.get_by_role("button", name="Deploy").count() == 0
            assert page.locator("[data-testid='stMainMenu']").count() == 0
        finally:
            ctx.close()


def test_a_line_image_sent_to_labeling_is_the_first_card_and_says_from_the_line(lab_ws, tmp_path, playwright):
    """What a monitor's "send to labeling" does: the image joins the pool and the top of the queue at once."""
    ws = Workspace.open(lab_ws)
    sent = content_id(log_line(ws, 1, flagged={0}, at=datetime.now(UTC), station="cam-7")[0])
    importing.line(lab_ws, ids=[sent], echo=lambda _: None)
    rounds.enqueue(ws, [sent])
    with page_server(lab_ws, tmp_path / "label.log") as url:
        ctx = browser(playwright)
        try:
            page = open_page(ctx, url, "ann")
            sync_api.expect(page.get_by_text(re.compile(r"^Rank 1 of \d+ · from the line \(station cam-7\)"))
                            ).to_be_visible()
            assert card_id(page) == sent
            sync_api.expect(page.get_by_text("From the line first")).to_be_visible()
            press_and_wait(page, "d", f"{sent} → defect")
        finally:
            ctx.close()
    assert events_on_disk(lab_ws) == [(sent, "defect", "ann")]

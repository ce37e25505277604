"""The line monitor page in a real browser: `aae-ray monitor` on loopback, Debian's Chromium driven by Playwright.

A planted shift in the log must show as a drift alarm on the page, and its button must put the alarm's image at
the top of the labeling queue on disk. The page opens on the last 24 hours, and says so where they are empty.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest
from conftest import page_server
from test_labeling_browser import TIMEOUT_MS, browser
from test_monitor import log_stream, shifted

from aae_ray import monitor
from aae_ray.workspace import Workspace

sync_api = pytest.importorskip("playwright.sync_api")
expect, WAIT = sync_api.expect, {"timeout": TIMEOUT_MS}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


@contextlib.contextmanager
def monitor_page(ws_path, tmp_path, playwright, *extra: str):
    """`aae-ray monitor WS` on loopback, opened in Chromium."""
    with page_server(ws_path, tmp_path / "monitor.log", True, "monitor", *extra) as url:
        ctx = browser(playwright)
        try:
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            ctx.close()


def test_the_page_shows_a_planted_shift_and_sends_its_image_to_labeling(scored_copy_path, tmp_path, playwright):
    ws = Workspace.open(scored_copy_path)
    start = datetime.now(UTC) - timedelta(minutes=10)
    ids = log_stream(ws, shifted(150, 100, 2.0), station="cam-7", start=start, step=timedelta(seconds=2),
                     pngs=True)
    # in-control ARL 5000 images: a false alarm among the 150 before the shift is unlikely (3%), none with this seed
    with monitor_page(scored_copy_path, tmp_path, playwright, "--arl0", "5000") as page:
        expect(page.get_by_text("Latest alarms")).to_be_visible(**WAIT)
        expect(page.get_by_text(re.compile(r"station cam-7 round 0: drift up")).first).to_be_visible(**WAIT)
        metric = page.locator('[data-testid="stMetric"]', has_text="Drift alarms")
        expect(metric).to_contain_text("1", **WAIT)
        expect(page.locator('[data-testid="stImage"]').first).to_be_visible(**WAIT)  # the charts
        page.get_by_role("button", name="Send to labeling").first.click()
        expect(page.get_by_text(re.compile(r"first in round 0's labeling queue"))).to_be_visible(**WAIT)
    (alarm,) = [a for a in monitor.read_alarms(ws) if a["kind"] == "drift"]
    assert ids.index(alarm["image_id"]) >= 150  # raised by the shift, not before it
    rows = sorted(pq.read_table(ws.round_dir(0) / "scores.parquet").to_pylist(), key=lambda r: r["rank"])
    assert rows[0]["id"] == alarm["image_id"]
    pool = ws.images().to_pylist()
    assert [r["source"] for r in pool if r["id"] == alarm["image_id"]] == ["line:cam-7"]


def test_the_page_opens_on_the_last_day_and_names_a_quiet_line(scored_copy_path, tmp_path, playwright):
    ws = Workspace.open(scored_copy_path)
    log_stream(ws, shifted(50, 0, 0.0), station="cam-3", start=datetime.now(UTC) - timedelta(days=3))
    with monitor_page(scored_copy_path, tmp_path, playwright) as page:
        expect(page.get_by_text("No image served in the last 24 hours")).to_be_visible(**WAIT)
        page.locator('[data-testid="stSelectbox"]', has_text="Time").click()
        page.get_by_role("option", name="last 7 days").click()
        expect(page.locator('[data-testid="stMetric"]', has_text="Served images")).to_contain_text("50", **WAIT)

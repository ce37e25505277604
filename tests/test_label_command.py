"""`aae-ray label`: a real Streamlit server for the labeling page, on loopback only."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from conftest import label_server, run_cli


@pytest.mark.slow
def test_label_serves_the_page_on_loopback(scored_ws, tmp_path):
    with label_server(scored_ws, tmp_path / "label.log") as url:
        with urllib.request.urlopen(f"{url}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        port = int(url.rsplit(":", 1)[1])
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        bound = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]  # 0A: LISTEN
        assert bound == ["0100007F:" + f"{port:04X}"]  # 127.0.0.1 only


def test_label_on_a_folder_that_is_not_a_workspace_is_one_error_line(tmp_path, capsys):
    assert run_cli("label", tmp_path) == 2
    assert capsys.readouterr().err.startswith("aae-ray: error: ")

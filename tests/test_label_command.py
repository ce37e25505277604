"""`aae-ray label`: a real Streamlit server for the labeling page, on loopback only."""

from __future__ import annotations

import urllib.request

import pytest
from conftest import label_server, listening_on, run_cli


@pytest.mark.slow
def test_label_serves_the_page_on_loopback(scored_ws, tmp_path):
    with label_server(scored_ws, tmp_path / "label.log") as url:
        with urllib.request.urlopen(f"{url}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        assert listening_on(int(url.rsplit(":", 1)[1])) == ["127.0.0.1"]


def test_label_on_a_folder_that_is_not_a_workspace_is_one_error_line(tmp_path, capsys):
    assert run_cli("label", tmp_path) == 2
    assert capsys.readouterr().err.startswith("aae-ray: error: ")

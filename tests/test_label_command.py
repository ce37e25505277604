"""`aae-ray label`: a real Streamlit server for the labeling page, on loopback only."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import listening_on, page_server, run_cli


@pytest.mark.slow
def test_label_serves_the_page_on_loopback(scored_ws, tmp_path):
    with page_server(scored_ws, tmp_path / "label.log") as url:
        with urllib.request.urlopen(f"{url}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        assert listening_on(int(url.rsplit(":", 1)[1])) == ["127.0.0.1"]


def test_label_on_a_folder_that_is_not_a_workspace_is_one_error_line(tmp_path, capsys):
    assert run_cli("label", tmp_path) == 2
    assert capsys.readouterr().err.startswith("aae-ray: error: ")


@pytest.mark.slow
def test_sigterm_to_aae_ray_label_alone_stops_streamlit_too(scored_ws, tmp_path):
    """A `kill` of the command's own process (not its group, as a terminal's Ctrl-C would reach): it passes the
    signal on, says it stopped, and leaves no Streamlit process behind holding the port."""
    with page_server(scored_ws, tmp_path / "label.log", stop=False) as (url, proc):
        streamlit = children(proc.pid)
        assert streamlit, "aae-ray label runs Streamlit in a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "labeling page stopped" in (tmp_path / "label.log").read_text()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in streamlit) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in streamlit if Path(f"/proc/{p}").exists()]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out

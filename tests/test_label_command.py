"""`aae-ray label`: a real Streamlit server for the labeling page, on loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_label_serves_the_page_on_loopback(scored_ws, tmp_path):
    port = _free_port()
    log = (tmp_path / "label.log").open("w")
    proc = subprocess.Popen([BIN / "aae-ray", "label", scored_ws, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    health = r.read().decode()
            except OSError:
                assert proc.poll() is None, (tmp_path / "label.log").read_text()
                time.sleep(0.3)
        assert health == "ok", (tmp_path / "label.log").read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        bound = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]  # 0A: LISTEN
        assert bound == ["0100007F:" + f"{port:04X}"]  # 127.0.0.1 only
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_label_on_a_folder_that_is_not_a_workspace_is_one_error_line(tmp_path, capsys):
    assert run_cli("label", tmp_path) == 2
    assert capsys.readouterr().err.startswith("aae-ray: error: ")

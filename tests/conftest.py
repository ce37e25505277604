"""Tiny shared fixtures: one synthetic workspace, one trained workspace, one in-memory solder data set and one
fitted detector, each built once per session. Tests that write into a workspace take `ws_copy` instead."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from aae_ray import cli
from aae_ray.config import AAEConfig
from aae_ray.data.synthetic import make_synthetic_records
from aae_ray.detector import Detector
from aae_ray.serving import free_port
from aae_ray.workspace import Workspace

# With two cores shared with other jobs, torch's default of one thread a core oversubscribes them: measured
# 5 s an epoch (200 images, 32x32) with 2 threads against 0.07 s with 1.
torch.set_num_threads(1)

# The smallest model that still trains: what every test that fits a detector uses unless it needs more.
TINY = {"base_channels": 8, "fc_units": 32, "batch_size": 64, "latent_dim": 8}
TINY_SET = [f"--set={k}={v}" for k, v in TINY.items()]


@pytest.fixture(autouse=True)
def _seed_torch():
    """Detector.fit seeds itself, but the tests that build models directly draw from torch's global RNG:
    without this their results would depend on which tests ran before them."""
    torch.manual_seed(0)


def tiny_config(**overrides) -> AAEConfig:
    return AAEConfig(**{**TINY, "epochs": 2, **overrides})


def run_cli(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="session")
def synthetic_ws(tmp_path_factory) -> Path:
    """`aae-ray init` on 120 normal and 24 defect synthetic joints at 32x32. Read-only: copy it to write."""
    ws = tmp_path_factory.mktemp("synthetic") / "ws"
    assert run_cli("init", ws, "--source", "synthetic", "--n-normal", "120", "--n-defect", "24", "--size", "32") == 0
    return ws


@pytest.fixture
def ws_copy(synthetic_ws, tmp_path) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(synthetic_ws, dest)
    return dest


@pytest.fixture(scope="session")
def trained_ws(synthetic_ws, tmp_path_factory) -> Path:
    """The synthetic workspace after `aae-ray train --epochs 2` on the tiny model. Read-only."""
    ws = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(synthetic_ws, ws)
    torch.manual_seed(0)
    assert run_cli("train", ws, "--epochs", "2", *TINY_SET, "--no-progress") == 0
    from aae_ray.export import ensure_export

    ensure_export(Workspace.open(ws), 0)  # what a CPU replica serves (engine auto); copies inherit it
    return ws


@pytest.fixture(scope="session")
def scored_ws(trained_ws) -> Path:
    """The trained workspace after `aae-ray score` (scoring only adds rounds/r000/scores.parquet)."""
    assert run_cli("score", trained_ws) == 0
    return trained_ws


@pytest.fixture
def scored_copy_path(scored_ws, tmp_path) -> Path:
    """A writable copy of the scored workspace: labels, rounds and promotions may be added to it."""
    return Path(shutil.copytree(scored_ws, tmp_path / "ws"))


@dataclass(frozen=True)
class Solder:
    """Synthetic solder joints as model input: X float32 (N, 1, 32, 32), truth 0/1, split names."""

    X: np.ndarray
    truth: np.ndarray
    split: np.ndarray

    @property
    def fit_mask(self) -> np.ndarray:
        """Everything a model may train on (train, val and pool); test is for reporting."""
        return self.split != "test"

    @property
    def normals(self) -> np.ndarray:
        return self.X[self.fit_mask & (self.truth == 0)]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[self.split == "test"], self.truth[self.split == "test"]


@pytest.fixture(scope="session")
def solder() -> Solder:
    """400 normal and 120 defect joints: 418 to fit on (78 of them defects), 102 to test (42 defects)."""
    records = make_synthetic_records(seed=0, n_normal=400, n_defect=120, size=32)
    X = np.stack([r.pixels for r in records]).astype(np.float32)[:, None] / 255.0
    return Solder(X, np.array([r.truth for r in records], dtype=np.int8), np.array([r.split for r in records]))


@pytest.fixture(scope="session")
def fitted(solder) -> Detector:
    """An AAE detector (the default 32-dim latent) fitted for 5 epochs on the 340 solder normals. Read-only."""
    torch.manual_seed(0)
    return Detector(tiny_config(latent_dim=32, epochs=5, seed=0)).fit(solder.normals)


# A trial whose lr is exactly this gets its weights poisoned with NaN after epoch 1 (aae_ray.tuning.trainable).
POISONED_LR = 0.000777


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs 5-6 s): 2 CPUs, NaN injection armed."""
    ray = pytest.importorskip("ray")
    from aae_ray.tuning.trainable import INJECT_NAN_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {INJECT_NAN_ENV: f"lr={POISONED_LR}"}})
    yield ray
    ray.shutdown()


def listening_on(port: int) -> list[str]:
    """The local addresses with a TCP socket listening on `port` (IPv4, from /proc/net/tcp): '127.0.0.1' etc."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    hexes = [r[1].split(":")[0] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]  # 0A: LISTEN
    return [".".join(str(b) for b in reversed(bytes.fromhex(h))) for h in hexes]


@contextmanager
def page_server(ws: Path, log_path: Path, stop: bool = True, command: str = "label", *extra: str) -> Iterator:
    """`aae-ray label WS` (or `command`: monitor) as a real Streamlit server on a free loopback port; yields its
    URL once healthy, or (URL, process) with `stop=False` for a test that stops it itself (what is left is still
    killed)."""
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen([Path(sys.executable).parent / "aae-ray", command, ws, "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    health = r.read().decode()
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.3)
        assert health == "ok", log_path.read_text()
        yield f"http://127.0.0.1:{port}" if stop else (f"http://127.0.0.1:{port}", proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


def pytest_collection_modifyitems(config, items):
    """A test that starts Ray (through `ray_local`, or a fixture built on it such as test_serve's `served`) is
    slow by definition; `make test-fast` leaves it out."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

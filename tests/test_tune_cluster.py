"""`aae-ray tune --address`: a search joins an existing Ray cluster and spreads its trials over the cluster's nodes;
`aae-ray score --address` scores the pool there.

The cluster is real: a head and a worker node started with `ray start` on this machine (1 CPU each), in a temp dir
of their own. It is torn down by killing only its own processes (never `ray stop`, which stops every Ray of the
user, other test runs included). Every command that talks to it runs in a subprocess with RAY_AUTH_MODE=token
(Ray 2.60 clusters refuse everyone else), so this pytest process never joins it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from aae_ray import artifacts
from aae_ray.serving import free_port

BIN = Path(sys.executable).parent  # the venv's bin: ray, aae-ray and python
OBJECT_STORE_BYTES = 300_000_000  # without it each node claims a share of the whole machine's memory
TUNE_TIMEOUT_S = 300
# A driver that cannot reach its cluster must say so within this time; with a fix it takes seconds (imports).
DEAD_ADDRESS_LIMIT_S = 30

SPEC = """\
num_samples: 4
max_concurrent: 2
resources: {cpu: 1}
scheduler: {asha: false}
report: {anomaly_ratio_sweep: false}
searcher: {n_startup_trials: 2}
space: {latent_dim: {int: [4, 12]}}
fixed: {epochs: 3, batch_size: 64, base_channels: 8, fc_units: 32, input_size: 32}
"""

ALIVE_NODES = """\
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])))
"""


@dataclass(frozen=True)
class Cluster:
    address: str  # 127.0.0.1:PORT of the head's GCS
    node_ids: frozenset[str]  # the two alive nodes
    temp_dir: str


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token"}


def run(cmd: list[str | Path], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run cmd in a process group of its own; on timeout kill the whole group and raise TimeoutExpired."""
    proc = subprocess.Popen([str(c) for c in cmd], env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def alive_node_ids(address: str) -> list[str]:
    res = run([BIN / "python", "-c", ALIVE_NODES, address], timeout=60)
    assert res.returncode == 0, res.stdout[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the cluster's processes ---------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, int, str]]:
    """This user's live processes: pid -> (parent pid, process group, command line)."""
    out = {}
    uid = os.getuid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid != uid:
                continue
            state, ppid, pgid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            out[int(d.name)] = (int(ppid), int(pgid), cmd)
    return out


def cluster_pids(temp_dir: str, port: int, groups: set[int]) -> set[int]:
    """The cluster's processes: those in the `ray start` process groups or whose command line names its temp dir
    or GCS port, and all their descendants (Ray puts its worker processes, `ray::IDLE` & co, in groups of their
    own and renames them, so only their parentage ties them to the cluster)."""
    mine = re.compile(rf"{re.escape(temp_dir)}(/|\s|$)|:{port}\b")
    procs = _processes()
    found = {pid for pid, (_, pgid, cmd) in procs.items() if pgid in groups or mine.search(cmd)}
    while True:
        children = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        if not children:
            break
        found |= children
    return found - {os.getpid(), os.getppid()}


def teardown(temp_dir: str, port: int, groups: set[int], grace_s: float = 3) -> None:
    """SIGTERM the cluster's processes, SIGKILL what is left after grace_s, remove the temp dir.

    The grace is short on purpose: measured, the raylets take ~10 s to exit on SIGTERM and the GCS server and the
    autoscaler monitor were still alive 20 s after it. Nothing of a throwaway cluster needs a clean shutdown."""
    pids = cluster_pids(temp_dir, port, groups)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids = cluster_pids(temp_dir, port, groups) | (pids & set(_processes()))
            if not pids:
                break
            time.sleep(0.2)
        if not pids:
            break
    shutil.rmtree(temp_dir, ignore_errors=True)  # also holds the ray_current_cluster file `ray start` wrote
    assert not pids, f"cluster processes still alive after SIGKILL: {sorted(pids)}"


def ray_start(args: list[str], temp_dir: str, groups: set[int]) -> None:
    cmd = [BIN / "ray", "start", "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
    proc = subprocess.Popen([str(c) for c in cmd], env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    groups.add(proc.pid)  # its daemons stay in this group after it exits
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, 1 CPU each, both alive; always torn down, even when starting them failed."""
    temp_dir = "/tmp/rc" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))
    port = free_port()
    address = f"127.0.0.1:{port}"
    groups: set[int] = set()
    try:
        ray_start(["--head", f"--port={port}", "--include-dashboard=false"], temp_dir, groups)
        ray_start([f"--address={address}"], temp_dir, groups)
        deadline = time.monotonic() + 60
        while len(nodes := alive_node_ids(address)) < 2:
            assert time.monotonic() < deadline, f"the cluster at {address} has {len(nodes)} alive node(s), not 2"
            time.sleep(1)
        assert len(nodes) == 2
        yield Cluster(address, frozenset(nodes), temp_dir)
    finally:
        teardown(temp_dir, port, groups)


def write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


# --- the tests -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tune_job_on_a_two_node_cluster_runs_trials_on_both_nodes(cluster, ws_copy, tmp_path):
    """Two trials at once, 1 CPU each, on two 1-CPU nodes: the driver sees both nodes, every trial reports the node
    it ran on, together they used both of the cluster's nodes, and the best model is exported as usual."""
    res = run([BIN / "aae-ray", "tune", ws_copy, "--config", write_spec(tmp_path), "--address", cluster.address],
              timeout=TUNE_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-5000:]
    assert re.search(r"^ray: 2 node\(s\), 2 CPU, 0 GPU$", res.stdout, re.M), res.stdout[-5000:]

    results = sorted((ws_copy / "rounds" / "r000" / "tune").glob("train_trial_*/result.json"))
    assert len(results) == 4
    nodes_by_trial = [{json.loads(line)["node"] for line in p.read_text().splitlines() if line.strip()}
                      for p in results]
    assert all(len(nodes) == 1 for nodes in nodes_by_trial)  # a trial runs on one node, every epoch says which
    assert set().union(*nodes_by_trial) == cluster.node_ids

    model = ws_copy / "rounds" / "r000" / "model"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["round"] == 0 and metrics["config"]["epochs"] == 3
    det = artifacts.load(model)
    assert det.config.latent_dim == metrics["config"]["latent_dim"]


@pytest.mark.slow
def test_an_address_where_no_cluster_listens_fails_fast_with_a_clear_error(ws_copy, tmp_path):
    """`--address` to a port nobody listens on: a non-zero exit within seconds, with one error line that names the
    address, not minutes of Ray's retry warnings."""
    port = free_port()
    start = time.monotonic()
    res = run([BIN / "aae-ray", "tune", ws_copy, "--config", write_spec(tmp_path), "--address", f"127.0.0.1:{port}"],
              timeout=DEAD_ADDRESS_LIMIT_S)
    assert time.monotonic() - start < DEAD_ADDRESS_LIMIT_S
    assert res.returncode != 0
    errors = [ln for ln in res.stdout.splitlines() if ln.startswith("aae-ray: error:")]
    assert len(errors) == 1 and str(port) in errors[0], res.stdout[-3000:]


@pytest.mark.slow
def test_a_workspace_given_by_a_relative_path_tunes_like_an_absolute_one(cluster, ws_copy, tmp_path):
    """`cd PARENT && aae-ray tune ws ...`: the usual way to name a workspace works for tuning too."""
    spec = write_spec(tmp_path, SPEC.replace("num_samples: 4", "num_samples: 2").replace("epochs: 3", "epochs: 1"))
    res = run([BIN / "aae-ray", "tune", ws_copy.name, "--config", spec, "--address", cluster.address],
              timeout=TUNE_TIMEOUT_S, cwd=ws_copy.parent)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (ws_copy / "rounds" / "r000" / "model" / "metrics.json").is_file()


@pytest.mark.slow
def test_score_with_an_address_scores_the_pool_on_the_cluster(cluster, scored_copy_path):
    """`aae-ray score WS --address A`: Ray Data actors on the cluster score the pool, and the queue they write is
    the one this process writes with `--engine local`."""
    import pyarrow.parquet as pq

    queue = scored_copy_path / "rounds" / "r000" / "scores.parquet"
    res = run([BIN / "aae-ray", "score", scored_copy_path, "--address", cluster.address], timeout=TUNE_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-5000:]
    on_cluster = pq.read_table(queue).to_pydict()
    res = run([BIN / "aae-ray", "score", scored_copy_path, "--engine", "local"], timeout=TUNE_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-5000:]
    here = pq.read_table(queue).to_pydict()
    assert on_cluster["id"] == here["id"] and on_cluster["rank"] == here["rank"]
    assert on_cluster["score"] == pytest.approx(here["score"], rel=1e-5)
    res = run([BIN / "aae-ray", "score", scored_copy_path, "--engine", "local", "--address", cluster.address],
              timeout=60)
    assert res.returncode == 2 and "--engine ray or auto" in res.stdout

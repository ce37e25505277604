"""Interrupting and resuming `aae-ray tune` (real Ray, real subprocesses): a `kill -9` of the whole run or a
Ctrl-C leaves an experiment that `--resume` finishes without re-running finished trials and without duplicate or
dangling trials in the persisted Optuna study; `--resume` without an experiment and a second run over an existing
one are refused with one clear line.

Every run starts its own local Ray under a private RAY_TMPDIR, so what a run leaves behind can be found by its
process group or that folder, and killed by process id, without touching anyone else's Ray on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_cli

from aae_ray import artifacts

AAE_RAY = Path(sys.executable).with_name("aae-ray")
NUM_SAMPLES = 6
EPOCHS = 8  # ~1.5 s a trial here: long enough to catch one mid-run, short enough for the whole file
SPEC = {
    "metric": "val_auroc",
    "num_samples": NUM_SAMPLES,
    "max_concurrent": 1,  # trials run one after the other: "two finished, the third running" is a clear state
    "resources": {"cpu": 1},
    "scheduler": {"asha": False},  # every trial runs all its epochs: a finished trial is one with a checkpoint
    "searcher": {"n_startup_trials": 2, "seed": 0},
    "report": {"anomaly_ratio_sweep": False},
    "space": {"latent_dim": {"int": [4, 12]}, "lr": {"loguniform": [5.0e-4, 3.0e-3]}},
    "fixed": {"epochs": EPOCHS, "batch_size": 64, "base_channels": 8, "fc_units": 32, "input_size": 32},
}
STUDY = "aae-ray-r000"
RUN_TIMEOUT_S = 300  # a whole (resumed) run takes ~20 s here
WAIT_TIMEOUT_S = 180  # for the state a test interrupts the run in


# --- running `aae-ray` as a process group of its own --------------------------------------------------------------


@dataclass
class Run:
    """One `aae-ray` process, leader of its own process group, with a private Ray temp folder."""

    proc: subprocess.Popen
    logs: Path
    ray_tmp: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return (self.logs / "stdout.txt").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.logs / "stderr.txt").read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"`aae-ray` still running after {timeout:.0f} s, killed\n{self.output()}")

    def processes(self) -> dict[int, str]:
        """Live processes of this run: its process group, and any process naming its Ray temp folder."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
            if state == "Z" or not cmdline:
                continue  # a zombie is dead already, it only waits for its parent to reap it
            if int(pgrp) == self.pid or str(self.ray_tmp) in cmdline:
                found[int(entry.name)] = cmdline[:200]
        return found

    def wait_for_no_processes(self, timeout: float) -> dict[int, str]:
        """What is still alive after `timeout` seconds (nothing, once Ray has gone down)."""
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def kill_leftovers(self) -> None:
        """SIGKILL, by id, only processes of this run's group or naming its private temp folder."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Launcher:
    """Starts `aae-ray` runs, each with a short private RAY_TMPDIR (Ray's socket paths must stay under 107
    bytes), and cleans up after all of them."""

    def __init__(self):
        self.runs: list[Run] = []

    def start(self, *args: str | Path) -> Run:
        folder = Path(tempfile.mkdtemp(prefix="aae-rt-", dir="/tmp"))
        ray_tmp = folder / "ray"
        ray_tmp.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("AAE_RAY_DEBUG", "RAY_ADDRESS", "TUNE_GLOBAL_CHECKPOINT_S"):  # a local Ray, the runner's defaults
            env.pop(name, None)
        with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([str(AAE_RAY), *map(str, args)], stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.runs.append(Run(proc, folder, ray_tmp))
        return self.runs[-1]

    def complete(self, *args: str | Path) -> tuple[int, str]:
        """Run to the end; the exit code and the output. A run that ends leaves no Ray process behind."""
        run = self.start(*args)
        code = run.wait(RUN_TIMEOUT_S)
        left = run.wait_for_no_processes(20)
        assert not left, f"Ray processes outlived a finished run: {left}\n{run.output()}"
        return code, run.output()

    def close(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.kill_group()
            run.kill_leftovers()
            shutil.rmtree(run.logs, ignore_errors=True)


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


# --- reading the experiment -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialDir:
    trial_id: str
    path: Path

    @property
    def finished(self) -> bool:
        """Only the last epoch saves a checkpoint (the model artifact)."""
        return any(self.path.glob("checkpoint_*"))

    def result_lines(self) -> int:
        try:
            return (self.path / "result.json").read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def results(self) -> list[dict]:
        return [json.loads(line) for line in (self.path / "result.json").read_text().splitlines() if line.strip()]

    def checkpoint_files(self) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of every checkpoint folder and file: a re-run rewrites or renames them."""
        return {str(p.relative_to(self.path)): (p.stat().st_size, p.stat().st_mtime_ns)
                for ckpt in self.path.glob("checkpoint_*") for p in [ckpt, *ckpt.rglob("*")]}


def trial_dirs(ws: Path) -> dict[str, TrialDir]:
    """Tune's trial folders (`train_trial_<id>_<n>_<config>_<time>`) by trial id."""
    return {d.name.split("_")[2]: TrialDir(d.name.split("_")[2], d)
            for d in sorted(experiment(ws).glob("train_trial_*")) if d.is_dir()}


def experiment(ws: Path) -> Path:
    return ws / "rounds" / "r000" / "tune"


def new_workspace(synthetic_ws: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the synthetic workspace and the spec file, under root."""
    shutil.copytree(synthetic_ws, root / "ws")
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return root / "ws", root / "spec.yaml"


def wait_for(run: Run, ws: Path, what: str, ready) -> dict[str, TrialDir]:
    """Poll the experiment every 50 ms until ready(trials); fail (with the output) if the run ends first."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not ready(trials := trial_dirs(ws)):
        if run.proc.poll() is not None:
            pytest.fail(f"the run ended (exit {run.proc.returncode}) before {what}: {len(trials)} trials started, "
                        f"{sum(t.finished for t in trials.values())} finished; make EPOCHS larger\n{run.output()}")
        if time.monotonic() > deadline:
            run.kill_group()
            pytest.fail(f"no {what} after {WAIT_TIMEOUT_S} s\n{run.output()}")
        time.sleep(0.05)
    return trials


def moved_on(n_finished: int):
    """n trials finished and the next one has reported an epoch: Tune has recorded the n as finished (with one
    trial at a time it starts the next only then), so this state is a safe one to interrupt in."""
    def ready(trials: dict[str, TrialDir]) -> bool:
        done = sum(t.finished for t in trials.values())
        return done >= n_finished and any(not t.finished and t.result_lines() > 0 for t in trials.values())
    return ready


def finished_ids(trials: dict[str, TrialDir]) -> set[str]:
    return {t.trial_id for t in trials.values() if t.finished}


def snapshot(ws: Path, ids: set[str]) -> dict[str, tuple[str, dict]]:
    """result.json and the checkpoint files of these trials. Taken once the run has stopped: while it runs, Tune
    rewrites every trial's result.json in the experiment folder at each state save."""
    trials = trial_dirs(ws)
    return {i: ((trials[i].path / "result.json").read_text(), trials[i].checkpoint_files()) for i in ids}


def assert_not_rerun(ws: Path, finished: dict[str, tuple[str, dict]], output: str) -> None:
    """The trials that had finished when the run stopped kept their results (a re-run rewrites them with new
    timestamps) and their checkpoint files (a re-run rewrites them, even with identical weights)."""
    trials = trial_dirs(ws)
    for trial_id, (results, files) in finished.items():
        assert trial_id in trials, f"finished trial {trial_id} vanished\n{output}"
        lines = results.count("\n")
        assert lines == EPOCHS, f"trial {trial_id} had {lines} result lines once stopped, though it had finished"
        assert (trials[trial_id].path / "result.json").read_text() == results, f"trial {trial_id} re-ran\n{output}"
        assert trials[trial_id].checkpoint_files() == files, f"trial {trial_id}'s checkpoint was rewritten\n{output}"


def assert_finished_consistently(ws: Path, output: str) -> None:
    """All NUM_SAMPLES trials exist once, finished, with one result per epoch; the Optuna study holds exactly
    those trials (same configs, each told the value its last epoch reported), none left RUNNING; the best model
    was exported and the summary says the run is complete."""
    trials = trial_dirs(ws)
    assert len(trials) == NUM_SAMPLES, f"{sorted(trials)}\n{output}"
    for t in trials.values():
        assert t.finished, f"trial {t.trial_id} has no checkpoint\n{output}"
        epochs = [r["epoch"] for r in t.results()]
        assert epochs == list(range(1, EPOCHS + 1)), f"trial {t.trial_id} reported epochs {epochs}\n{output}"

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{experiment(ws) / 'optuna.sqlite3'}")
    ot = study.get_trials(deepcopy=False)
    numbers = [t.number for t in ot]
    states = Counter(t.state.name for t in ot)
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {sorted(numbers)}"
    assert len(ot) == NUM_SAMPLES, f"{len(ot)} study trials {dict(states)} for {NUM_SAMPLES} Tune trials"
    assert states["RUNNING"] == 0, dict(states)
    assert states["COMPLETE"] == sum(t.finished for t in trials.values()), dict(states)

    def key(params: dict, value: float) -> tuple:
        return params["latent_dim"], round(params["lr"], 12), round(value, 12)

    tune_side = sorted(key(json.loads((t.path / "params.json").read_text()), t.results()[-1]["val_auroc"])
                       for t in trials.values())
    study_side = sorted(key(t.params, t.value) for t in ot if t.state.name == "COMPLETE")
    assert tune_side == study_side

    model = ws / "rounds" / "r000" / "model"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["trial"] in trials
    assert artifacts.load(model).threshold_ > 0
    summary = json.loads((ws / "rounds" / "r000" / "tune_summary.json").read_text())
    assert summary["interrupted"] is False
    assert summary["trials"] == {"complete": NUM_SAMPLES}


# --- kill -9 of the whole run, then --resume --------------------------------------------------------------------


@dataclass
class Killed:
    ws: Path
    spec: Path
    finished: dict[str, tuple[str, dict]]  # trial id -> (result.json, checkpoint files), just after the kill
    started: dict[str, int]  # trial id -> result lines, of every trial that had started when it was killed
    survivors: dict[int, str]  # processes of the killed run still alive 15 s after the kill
    emptied: list[str]  # files of the experiment the kill left empty (it landed while Tune was copying them)
    resume_code: int = -1
    resume_output: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def killed_then_resumed(synthetic_ws, tmp_path_factory, launcher) -> Killed:
    """`aae-ray tune` SIGKILLed (its whole process group: driver and the Ray it started) while a third trial runs
    and two have finished, then `aae-ray tune WS --config SPEC --resume` run to its end."""
    ws, spec = new_workspace(synthetic_ws, tmp_path_factory.mktemp("killed"))
    t0 = time.monotonic()
    run = launcher.start("tune", ws, "--config", spec)
    ids = finished_ids(wait_for(run, ws, "two finished trials and a third running", moved_on(2)))
    os.killpg(run.pid, signal.SIGKILL)
    run.proc.wait(timeout=30)
    t_kill = time.monotonic()
    finished = snapshot(ws, ids)
    started = {t.trial_id: t.result_lines() for t in trial_dirs(ws).values()}
    survivors = run.wait_for_no_processes(15)
    run.kill_leftovers()  # if any survived, they must not slow down the resume
    emptied = sorted(str(p.relative_to(experiment(ws))) for p in experiment(ws).rglob("*")
                     if p.is_file() and p.stat().st_size == 0 and p.name != ".validate_storage_marker")
    k = Killed(ws, spec, finished, started, survivors, emptied)
    k.resume_code, k.resume_output = launcher.complete("tune", ws, "--config", spec, "--resume")
    k.seconds = {"run until killed": round(t_kill - t0, 1), "resume": round(time.monotonic() - t_kill, 1)}
    print(f"\nkill -9: {k.seconds}; result lines of the started trials when killed: {started}; "
          f"files left empty: {emptied}")
    return k


@pytest.mark.slow
def test_resume_after_kill_9_reruns_no_finished_trial_and_leaves_no_duplicates(killed_then_resumed):
    """After `kill -9` of the run, `--resume` finishes the search: the trials that had finished keep their results
    and checkpoints untouched, the interrupted one starts over, the rest run; the experiment ends with exactly
    num_samples trials and the Optuna study with exactly those (none RUNNING, no duplicate)."""
    k = killed_then_resumed
    assert len(k.finished) >= 2 and len(k.started) > len(k.finished), k.started  # it was killed mid-trial
    context = f"files the kill left empty: {k.emptied}\n{k.resume_output}"
    assert k.resume_code == 0, context
    assert_not_rerun(k.ws, k.finished, context)
    assert_finished_consistently(k.ws, context)


@pytest.mark.slow
def test_kill_9_of_the_process_group_leaves_no_ray_processes(killed_then_resumed):
    """The local Ray that `aae-ray tune` starts (gcs_server, raylet, workers) lives in the command's process group
    or dies with it: SIGKILL of that group leaves nothing running."""
    assert not killed_then_resumed.survivors, "\n".join(f"{pid}: {cmd}" for pid, cmd in
                                                        killed_then_resumed.survivors.items())


@pytest.mark.slow
def test_a_second_run_without_resume_refuses_to_overwrite(killed_then_resumed, launcher):
    """A finished experiment is never overwritten: `tune --round 0` without --resume exits 2 with one line that
    says to pass --resume or remove the folder, and leaves the round as it was."""
    ws = killed_then_resumed.ws

    def files() -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(ws)), p.stat().st_mtime_ns) for p in (ws / "rounds").rglob("*"))

    before = files()
    run = launcher.start("tune", ws, "--config", killed_then_resumed.spec, "--round", "0")
    assert run.wait(120) == 2, run.output()
    lines = run.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aae-ray: error:"), run.output()
    assert "--resume" in lines[0] and "remove" in lines[0] and str(experiment(ws)) in lines[0], lines[0]
    assert files() == before


# --- Ctrl-C, then the resume command it prints ------------------------------------------------------------------


@dataclass
class Interrupted:
    ws: Path
    code: int
    output: str
    seconds_to_exit: float
    finished: dict[str, tuple[str, dict]]
    leftovers: dict[int, str]
    hint: list[str] = field(default_factory=list)
    resume_code: int = -1
    resume_output: str = ""


@pytest.fixture(scope="module")
def interrupted_then_resumed(synthetic_ws, tmp_path_factory, launcher) -> Interrupted:
    """`aae-ray tune` sent one SIGINT (the driver only, where a terminal's Ctrl-C lands first) once a trial has
    finished and the next is running, then the resume command it printed run as printed, to its end."""
    ws, spec = new_workspace(synthetic_ws, tmp_path_factory.mktemp("interrupted"))
    run = launcher.start("tune", ws, "--config", spec)
    ids = finished_ids(wait_for(run, ws, "a finished trial and the next running", moved_on(1)))
    os.kill(run.pid, signal.SIGINT)
    t_int = time.monotonic()
    try:
        code = run.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill_group()
        pytest.fail(f"one SIGINT did not end `aae-ray tune` within 120 s\n{run.output()}")
    i = Interrupted(ws, code, run.output(), time.monotonic() - t_int, snapshot(ws, ids), run.wait_for_no_processes(20))
    run.kill_leftovers()
    hints = [line[line.index("aae-ray tune"):] for line in i.output.splitlines()
             if "aae-ray tune" in line and "--resume" in line]
    if hints:
        i.hint = shlex.split(hints[-1])
        i.resume_code, i.resume_output = launcher.complete(*i.hint[1:])
    print(f"\nctrl-c: exit {code} {i.seconds_to_exit:.1f} s after SIGINT; printed resume command: {hints}")
    return i


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_experiment_and_says_how(interrupted_then_resumed):
    """One Ctrl-C stops the run cleanly: it exits 130, prints the `aae-ray tune ... --resume` command, and stops
    the Ray it started; that command, run as printed, completes the search: finished trials are not re-run, the
    experiment and the study end with num_samples trials."""
    i = interrupted_then_resumed
    assert i.code == 130, i.output
    assert i.hint and i.hint[0] == "aae-ray" and "--resume" in i.hint, i.output
    assert not i.leftovers, f"Ray processes outlived the interrupted run: {i.leftovers}"
    assert i.resume_code == 0, i.resume_output
    assert_not_rerun(i.ws, i.finished, i.resume_output)
    assert_finished_consistently(i.ws, i.resume_output)


# --- refusals that need no Ray ------------------------------------------------------------------------------------


def test_resume_without_an_experiment_is_a_clear_error(ws_copy, capsys):
    """`--resume` on a workspace that was never tuned exits 2 with one `aae-ray: error:` line, before Ray starts
    and without creating a round; with an explicit `--round` too."""
    import ray

    ray_before = ray.is_initialized()  # other tests of the session may have started one
    for extra in ([], ["--round", "0"]):
        assert run_cli("tune", ws_copy, "--resume", *extra) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("aae-ray: error: nothing to resume"), err
    assert not (ws_copy / "rounds").exists()
    assert ray.is_initialized() == ray_before

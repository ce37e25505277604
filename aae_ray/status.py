"""What `aae-ray status` reports, read from the workspace: imports, images by split, labels, every round's model
and tuning, the promoted model and its threshold. Values only; the command prints them."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aae_ray import artifacts
from aae_ray.labels import current_labels, read_events
from aae_ray.monitor import alarm_summary
from aae_ray.prediction_log import UNNAMED_STATION, read_predictions
from aae_ray.scoring import describe_basis
from aae_ray.workspace import Workspace

SPLITS = ("train", "val", "test", "pool")


@dataclass(frozen=True)
class RoundStatus:
    round: int
    metrics: dict[str, Any] | None  # the model's metrics.json; None: the round has no model (yet)
    answered: dict[str, int]  # labels given on this round's queue, by label
    tune: dict[str, Any] | None  # tune_summary.json, if the round was tuned
    report: Path | None  # the round's report folder, if written


@dataclass(frozen=True)
class WorkspaceStatus:
    root: Path
    imports: list[dict[str, Any]]
    splits: dict[str, int]  # images by split, every split named
    labels: dict[str, int]  # current labels by label
    rounds: list[RoundStatus]
    current: dict[str, Any] | None  # current.json: the promoted round and model
    threshold: float | None = None
    threshold_note: str | None = None  # how the threshold was set, in words
    hidden_defects: str | None = None  # the estimated share of hidden defects (t2_trim: auto), in words
    t2_trim: float | None = None
    line: dict[str, Any] | None = None  # the prediction log: rows and stations; None: nothing served yet
    alarms: dict[str, Any] | None = None  # aae_ray.monitor.alarm_summary: how many, the latest in words


def workspace_status(ws: Workspace) -> WorkspaceStatus:
    splits = Counter(ws.images().column("split").to_pylist())
    events = read_events(ws.labels_dir).to_pylist()
    rounds = [_round_status(ws, n, events) for n in ws.rounds()]
    out = WorkspaceStatus(root=ws.root, imports=ws.settings()["imports"],
                          splits={k: splits.get(k, 0) for k in SPLITS},
                          labels=dict(sorted(Counter(current_labels(ws.labels_dir).values()).items())),
                          rounds=rounds, current=ws.current(), line=_line(ws), alarms=alarm_summary(ws))
    if out.current is None:
        return out
    m = artifacts.read_metrics(ws.current_model_dir())
    alpha = artifacts.read_config(ws.current_model_dir()).alpha
    basis, n_cal = m.get("threshold_basis") or m.get("threshold_method"), m.get("n_calibration")
    note = describe_basis(basis, n_cal, alpha) if n_cal is not None else f"threshold basis {basis}"
    hidden = m["contamination"]["note"] if "contamination" in m else None
    return replace(out, threshold=m.get("threshold"), threshold_note=note, hidden_defects=hidden,
                   t2_trim=m.get("t2_trim"))


def _round_status(ws: Workspace, n: int, events: list[dict[str, Any]]) -> RoundStatus:
    folder, round_dir = ws.model_dir(n), ws.round_dir(n)
    answered = Counter(e["label"] for e in events if e["round"] == n)
    tune_path = round_dir / "tune_summary.json"
    return RoundStatus(
        round=n, metrics=artifacts.read_metrics(folder) if (folder / "metrics.json").exists() else None,
        answered=dict(sorted(answered.items())),
        tune=json.loads(tune_path.read_text()) if tune_path.exists() else None,
        report=round_dir / "report" if (round_dir / "report").exists() else None)


def _line(ws: Workspace) -> dict[str, Any] | None:
    if not ws.predictions_dir.is_dir():
        return None
    t = read_predictions(ws.predictions_dir, columns=["ts", "station", "anomaly"])
    if not t.num_rows:
        return None
    ts = t.column("ts").to_pylist()
    return {"rows": t.num_rows, "flagged": sum(t.column("anomaly").to_pylist()), "first": min(ts), "last": max(ts),
            "stations": sorted({s or UNNAMED_STATION for s in t.column("station").to_pylist()})}

"""The model artifact (DESIGN.md): one `save` and one `load` shared by the CLI, Tune, Serve and the UI.

    weights.safetensors   the model's state dict (tensors only: loading never unpickles code)
    config.json           architecture and preprocessing (an AAEConfig)
    t2.json               the global latent's mean, inverse covariance, n, p, alpha and F limit
    local.safetensors     where the family has a local map: the local T2's means (L, d) and precisions (L, d, d)
    score.json            the primary score: which it is, the combined score's scales, and its limit
                          (threshold, threshold_basis, alpha, the sorted normal scores behind its p-values)
    metrics.json          round, val_auroc, test_auroc (null where a split has no labels), trial, ...
    trained_on.parquet    the ids of the images the model trained on (`id`): a later `aae-ray recalibrate`
                          must never set the threshold on them
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from aae_ray import __version__
from aae_ray.atomic import write_text
from aae_ray.config import AAEConfig, validate
from aae_ray.detector import Detector
from aae_ray.scoring import Hotelling, LocalHotelling, LocalNearest, ScoreLimit
from aae_ray.training_loop import build_model

FILES = ("weights.safetensors", "config.json", "t2.json", "score.json", "metrics.json")
TRAINED_ON = "trained_on.parquet"


class ArtifactError(ValueError):
    """A model folder that is missing files or does not match its own config."""


def save(detector: Detector, folder: Path, metrics: dict[str, Any], trained_on: list[str] | None = None) -> Path:
    """Write the artifact into `folder` atomically (a sibling temp folder renamed into place). `trained_on`:
    the ids of the images the model trained on, where the caller knows them (the workspace's commands)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.model_.state_dict().items()}
    safetensors.torch.save_file(state, tmp / "weights.safetensors")
    _write_json(tmp / "config.json", detector.config.model_dump())
    _write_json(tmp / "t2.json", detector.hotelling_.to_dict())
    if detector.local_ is not None:
        tensors = {k: torch.from_numpy(v) for k, v in detector.local_.arrays().items()}
        safetensors.torch.save_file(tensors, tmp / "local.safetensors")
    _write_json(tmp / "score.json", _score_json(detector))
    versions = {"aae_ray": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    _write_json(tmp / "metrics.json", {"versions": versions, **metrics})
    if trained_on is not None:
        pq.write_table(pa.table({"id": pa.array(sorted(trained_on), pa.string())}), tmp / TRAINED_ON)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _score_json(detector: Detector) -> dict[str, Any]:
    return {"primary": detector.primary_, "scales": detector.scales_, "t2_trim": detector.t2_trim_,
            **detector.limit_.to_dict()}


def load(folder: Path) -> Detector:
    """Rebuild a fitted Detector from an artifact folder; scores match the saved model exactly."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise ArtifactError(f"{folder} is not a model artifact: missing {', '.join(missing)}")
    cfg = read_config(folder)
    det = Detector(cfg)
    det.model_ = build_model(cfg)
    try:
        state = safetensors.torch.load_file(folder / "weights.safetensors")
    except Exception as exc:  # safetensors raises its own types for foreign or truncated files
        raise ArtifactError(f"{folder}: weights.safetensors is unreadable: {str(exc)[:200]}") from None
    try:
        det.model_.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{folder}: weights do not match config.json: {str(exc)[:200]}") from None
    det.model_.eval()
    det.hotelling_ = _read_hotelling(folder / "t2.json", det.model_.code_dim)
    local = folder / "local.safetensors"
    det.local_ = _read_local(local, cfg, det.model_.local_shape) if det.model_.has_local else None
    score = _read_json(folder / "score.json")
    try:
        det.limit_ = ScoreLimit.from_dict(score)
        det.primary_, det.scales_ = str(score["primary"]), {k: float(v) for k, v in score["scales"].items()}
        # artifacts from before t2_trim: auto say nothing: the config's number (auto could not have been set)
        det.t2_trim_ = float(score.get("t2_trim", cfg.t2_trim if cfg.t2_trim != "auto" else 0.0))
        det.contamination_ = None  # the estimate lives in metrics.json; the statistics it set are loaded above
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{folder / 'score.json'}: not score statistics ({type(exc).__name__}: {exc})") from None
    det.threshold_ = det.limit_.threshold
    return det


def read_config(folder: Path) -> AAEConfig:
    config = _read_json(Path(folder) / "config.json")
    if not isinstance(config, dict):
        raise ArtifactError(f"{Path(folder) / 'config.json'}: expected a JSON object")
    return validate(config, where=str(Path(folder) / "config.json"))


def _read_local(path: Path, cfg: AAEConfig, shape: tuple[int, int]) -> LocalHotelling | LocalNearest:
    if not path.exists():
        raise ArtifactError(f"{path.parent} is not a model artifact: missing {path.name} (its family has a local map)")
    try:
        t = {k: v.numpy() for k, v in safetensors.torch.load_file(path).items()}
        if cfg.local_stats == "nearest":
            bank = t["bank"]
        else:
            mean, precision = t["mean"], t["precision"]
    except Exception as exc:  # safetensors raises its own types for foreign or truncated files
        raise ArtifactError(f"{path}: not local T2 statistics: {str(exc)[:200]}") from None
    if cfg.local_stats == "nearest":
        if bank.ndim != 4 or tuple(bank.shape[2:]) != tuple(shape):
            raise ArtifactError(f"{path}: a nearest-normal bank {bank.shape} does not match the map {shape}")
        return LocalNearest(bank, cfg.local_reach, cfg.local_topk)
    if mean.ndim != 2 or precision.shape != (*mean.shape, mean.shape[1]) or len(mean) not in (1, shape[0] * shape[1]):
        raise ArtifactError(f"{path}: means {mean.shape} and precisions {precision.shape} do not match")
    return LocalHotelling(mean, precision, shape, cfg.local_topk)


def _read_hotelling(path: Path, latent_dim: int) -> Hotelling:
    t2 = _read_json(path)
    try:
        hot = Hotelling.from_dict(t2)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: not T2 statistics ({type(exc).__name__}: {exc})") from None
    if hot.p != latent_dim or hot.mean.shape != (latent_dim,) or hot.precision.shape != (latent_dim, latent_dim):
        raise ArtifactError(f"{path}: statistics for p={hot.p} do not match the model's code size {latent_dim}")
    return hot


def save_limit(detector: Detector, folder: Path, metrics: dict[str, Any]) -> None:
    """Rewrite only the primary score's limit (score.json) and merge `metrics` into metrics.json: a
    recalibration, weights and T2's statistics untouched. Each file is replaced atomically, score.json first
    (it is what scoring reads)."""
    folder = Path(folder)
    for name, data in (("score.json", _score_json(detector)), ("metrics.json", {**read_metrics(folder), **metrics})):
        write_text(folder / name, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def read_trained_on(folder: Path) -> set[str] | None:
    """The ids the model trained on, or None where the artifact does not say (a model from before this file,
    or one trained outside a workspace)."""
    path = Path(folder) / TRAINED_ON
    if not path.exists():
        return None
    try:
        return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise ArtifactError(f"{path}: not a list of training ids ({exc})") from None


def read_limit(folder: Path) -> ScoreLimit:
    """The primary score's limit alone (score.json), without loading the weights: what the monitor needs."""
    path = Path(folder) / "score.json"
    try:
        return ScoreLimit.from_dict(_read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a score limit ({type(exc).__name__}: {exc})") from None
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None


def read_metrics(folder: Path) -> dict[str, Any]:
    return _read_json(Path(folder) / "metrics.json")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


def _jsonable(x: Any) -> Any:
    """NaN -> null (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

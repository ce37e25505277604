"""Scoring over HTTP, without the web framework: settings, the model a replica holds (and reloads when a round is
promoted), the three routes' work, scoring and the JSON answers. Decoding and limits are in `aae_ray.http_input`,
the routes on FastAPI in `aae_ray.http_api`, Ray Serve's deployment in `serve/app.py`. Nothing here imports Ray.
The pixels go through `aae_ray.data.images.to_model_input`, the preprocessing of training and of
`aae-ray score`, so an image's T2 over HTTP equals its offline T2.

Status codes (DESIGN.md): 400 undecodable, empty or malformed input; 401 missing or wrong bearer token; 404 unknown
path; 405 wrong method; 413 body, image count or image pixels over the limits; 415 unsupported content type. Every
answer is JSON; errors are `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aae_ray import artifacts, monitor
from aae_ray.detector import Detector
from aae_ray.http_input import check_token, decode_request, parse_flag, parse_station, prepare, read_body
from aae_ray.prediction_log import LogSettings, PredictionLog
from aae_ray.workspace import Workspace

log = logging.getLogger(__name__)
MiB = 1024 * 1024
ROUTES = {"/health": "GET", "/model": "GET", "/score": "POST"}  # path -> its method


class ServeSettings(BaseModel):
    """What one endpoint serves and how; validated once, in the CLI or the `serve run` builder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workspace: Path
    token: str | None = Field(None, min_length=1)  # bearer token for /score and /model; None: open
    max_batch_size: int = Field(32, ge=1, le=1024)  # images scored in one forward pass
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1.0)  # how long a batch waits to fill (idle: added latency)
    max_body_bytes: int = Field(32 * MiB, ge=1024)  # 413 above; checked on Content-Length and while reading
    max_images: int = Field(64, ge=1, le=4096)  # images in one request; 413 above
    max_pixels: int = Field(25_000_000, ge=1)  # per image (5000 x 5000), read from the header before decoding
    reload_interval_s: float = Field(1.0, gt=0, le=3600)  # how often a replica looks at WS/current.json
    replicas: int | Literal["auto"] = 1  # "auto": Serve autoscaling (serve/app.py says the targets)
    num_cpus: float = Field(1.0, ge=0, le=256)  # Ray CPUs a replica reserves; torch gets that many threads
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU a replica when the cluster has GPUs
    # onnx: the round's export in ONNX Runtime (aae_ray.onnx_engine); auto: ONNX Runtime on a CPU replica where the
    # model exports (3.0x torch's throughput at 32 clients, 32x32: bench/results/serve_engines.md), else torch
    engine: Literal["auto", "torch", "onnx"] = "auto"
    # The prediction log (aae_ray.prediction_log, WS/predictions/): every answered image, its bytes for the
    # flagged ones and a sample of the others; written off the request path every log_flush_interval_s.
    log: bool = True
    log_images: Literal["flagged", "all", "none"] = "flagged"
    log_sample: float = Field(0.0, ge=0, le=1)
    log_flush_interval_s: float = Field(1.0, gt=0, le=3600)
    # Drift alarms (aae_ray.monitor): the replicas check the log this often (one of them an interval) and record
    # new alarms in WS/alarms/; GET /health shows them. 0: never (the monitor page and --report still do).
    alarm_check_s: float = Field(30.0, ge=0, le=86400)

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, v: Path) -> Path:  # replicas do not share the caller's working directory
        return v.expanduser().resolve()


def settings(**values: Any) -> ServeSettings:
    """ServeSettings from keyword values, with a one-line ValueError naming the bad key."""
    try:
        return ServeSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ValueError(f"serve setting {key}: {err['msg']}") from None


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


# --- the model a replica holds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A detector with where it came from. Swapped whole on reload, never changed in place."""

    detector: Detector
    pointer: str  # the text of WS/current.json it was loaded for
    round: int
    path: str
    promoted_at: str | None
    reason: str | None
    metrics: dict[str, Any]
    device: str

    @property
    def size(self) -> int:
        return self.detector.config.input_size

    def summary(self) -> dict[str, Any]:
        return {"round": self.round, "path": self.path, "promoted_at": self.promoted_at}

    def info(self) -> dict[str, Any]:
        """GET /model: the promoted round, its metrics, threshold and config."""
        lim = self.detector.limit_  # the primary score's limit
        return {**self.summary(), "reason": self.reason, "threshold": _num(self.detector.threshold_),
                "threshold_method": lim.method, "threshold_basis": lim.method, "primary_score": self.detector.primary_,
                "alpha": lim.alpha, "device": self.device,
                "metrics": self.metrics, "config": self.detector.config.model_dump()}


def load_current(ws: Workspace, device: str = "cpu", engine: str = "torch", threads: int | None = None
                 ) -> LoadedModel:
    """The promoted model of `ws` (WorkspaceError if none, ArtifactError if broken), on `device`; with engine
    "onnx", its export in ONNX Runtime (on the CPU, `threads` of it)."""
    text = ws.current_path.read_text() if ws.current_path.exists() else ""
    cur = json.loads(text) if text else None
    if not isinstance(cur, dict) or "model" not in cur:
        raise ValueError(f"{ws.root} has no promoted model yet (run `aae-ray train {ws.root}` or `aae-ray tune`)")
    folder = ws.root / cur["model"]
    det, device = _detector(ws, int(cur["round"]), folder, device, engine, threads)
    return LoadedModel(det, text, int(cur.get("round", -1)), cur["model"], cur.get("promoted_at"),
                       cur.get("reason"), artifacts.read_metrics(folder), device)


def _detector(ws: Workspace, round_no: int, folder: Path, device: str, engine: str, threads: int | None):
    """The Detector on torch, or its export on ONNX Runtime ("onnx"; "auto" on a CPU replica where it exports)."""
    from aae_ray import onnx_engine

    if onnx_engine.on_torch(engine, device):
        return artifacts.load(folder).to(device), device
    from aae_ray.export import ExportError

    try:
        return onnx_engine.load(ws, round_no, threads), "cpu (onnxruntime)"
    except (ExportError, ImportError) as exc:
        if engine == "onnx":
            raise
        log.info("round %s is served on torch: %s", round_no, exc)  # AnoGAN, nearest local stats, no onnxruntime
        return artifacts.load(folder).to(device), device


@dataclass(frozen=True)
class Item:
    """One image waiting for a batch: the model that was current when its request arrived, and its pixels."""

    model: LoadedModel
    x: np.ndarray  # float32 (1, S, S)
    explain: bool
    name: str | None = None


ScoreFn = Callable[[Item], Awaitable[dict[str, Any]]]


class ScoringService:
    """The endpoint's state and logic: the current model, reload on promotion, request handling, scoring."""

    def __init__(self, cfg: ServeSettings, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.ws = Workspace.open(cfg.workspace)
        self.model = self._load()
        self.reload_error: str | None = None
        self._failed_pointer: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = {"images": 0, "batches": 0, "largest_batch": 0}  # this replica's, since it started
        self._alarms: tuple[float, dict[str, Any]] | None = None
        self.log = PredictionLog(self.ws.predictions_dir, LogSettings(
            images=cfg.log_images, sample=cfg.log_sample, flush_interval_s=cfg.log_flush_interval_s)
        ) if cfg.log else None

    # --- hot reload ---------------------------------------------------------------------------------------
    def _load(self) -> LoadedModel:
        return load_current(self.ws, self.device, self.cfg.engine, max(1, int(self.cfg.num_cpus)))

    def reload_if_changed(self) -> bool:
        """Load the promoted model if WS/current.json changed. The new one is loaded fully, then swapped in
        with one assignment: requests already holding the old one finish on it. A model that fails to load
        is logged and skipped (the old one keeps serving) until current.json changes again."""
        try:
            text = self.ws.current_path.read_text()
        except OSError:
            return False
        if text == self.model.pointer or text == self._failed_pointer:
            return False
        try:
            new = self._load()
        except Exception as exc:  # a broken or half-copied artifact must not take the endpoint down
            self._failed_pointer, self.reload_error = text, f"{type(exc).__name__}: {exc}"
            log.error("keeping round %s: cannot load the promoted model: %s", self.model.round, self.reload_error)
            return False
        self.model, self.reload_error, self._failed_pointer = new, None, None
        log.info("now serving round %s (%s)", new.round, new.path)
        return True

    def start_watching(self) -> None:
        def loop() -> None:
            last_check = time.monotonic()
            while not self._stop.wait(self.cfg.reload_interval_s):
                self.reload_if_changed()
                if self.cfg.alarm_check_s and time.monotonic() - last_check >= self.cfg.alarm_check_s:
                    last_check = time.monotonic()
                    self.check_alarms()

        self._watcher = threading.Thread(target=loop, name="aae-ray-model-watcher", daemon=True)
        self._watcher.start()

    def check_alarms(self) -> None:
        """Record the log's new drift alarms (aae_ray.monitor); a failure is logged, never raised."""
        try:
            for alarm in monitor.check_alarms_if_due(self.ws, self.cfg.alarm_check_s):
                log.warning("alarm: %s", monitor.describe_alarm(alarm))
        except Exception as exc:  # a damaged log must not stop the watcher that reloads promoted models
            log.error("cannot check the prediction log for alarms: %s: %s", type(exc).__name__, exc)
        self._alarms = None

    def alarms(self) -> dict[str, Any]:
        """The alarm summary, read from WS/alarms/ at most every 2 s: /health is polled by load balancers."""
        cached = self._alarms
        if cached is None or time.monotonic() - cached[0] > 2.0:
            try:
                cached = (time.monotonic(), monitor.alarm_summary(self.ws))
            except Exception as exc:  # /health answers whatever the alarm files hold
                cached = (time.monotonic(), {"error": f"{type(exc).__name__}: {exc}"})
            self._alarms = cached
        return cached[1]

    def start_logging(self) -> None:
        if self.log is not None:
            self.log.start()

    def stop(self) -> None:
        """Stop watching for promotions and write the prediction log's last rows."""
        self._stop.set()
        if self.log is not None:
            self.log.close()

    # --- requests ------------------------------------------------------------------------------------------
    # The three routes' work (aae_ray.http_api routes to them; a refusal is a RequestError).
    def health(self) -> Reply:
        body = {"status": "ok", "model": self.model.summary(), "batching": dict(self.stats), "alarms": self.alarms()}
        return Reply(200, body | ({"reload_error": self.reload_error} if self.reload_error else {}))

    def model_info(self, authorization: str | None) -> Reply:
        check_token(authorization, self.cfg.token)
        return Reply(200, self.model.info() | {"reload_error": self.reload_error})

    async def score_request(self, headers: Mapping[str, str], query: Mapping[str, str], body: AsyncIterator[bytes],
                            score: ScoreFn) -> Reply:
        check_token(headers.get("authorization"), self.cfg.token)
        explain = parse_flag(query.get("explain"), "explain")
        station = parse_station(query.get("station") or headers.get("x-station"))
        raw = await read_body(body, headers.get("content-length"), self.cfg.max_body_bytes)
        uploads = decode_request(headers.get("content-type"), raw, max_images=self.cfg.max_images)
        model = self.model  # this request is scored by the model current now, even if a reload lands meanwhile
        X = await asyncio.to_thread(prepare, uploads, model.size, self.cfg.max_pixels)
        results = await asyncio.gather(*(score(Item(model, X[i], explain, up.name)) for i, up in enumerate(uploads)))
        if self.log is not None:
            self.log.record(results, [up.data for up in uploads], round_no=model.round, model=model.path,
                            station=station)
        return Reply(200, {"model": model.summary(), "results": list(results)})

    # --- scoring -------------------------------------------------------------------------------------------
    def score_items(self, items: list[Item]) -> list[dict[str, Any]]:
        """Score a batch (normally one model; after a promotion, maybe two), one forward pass per model."""
        with self._lock:
            self.stats["images"] += len(items)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.model), []).append(i)
        for idx in groups.values():
            model = items[idx[0]].model
            for i, result in zip(idx, score_images(model.detector, np.stack([items[i].x for i in idx]),
                                                   [items[i].explain for i in idx]), strict=True):
                out[i] = {"name": items[i].name, **result}
        return out  # type: ignore[return-value]

    async def score_unbatched(self, item: Item) -> dict[str, Any]:
        """A `score` for servers without batching."""
        return (await asyncio.to_thread(self.score_items, [item]))[0]


def score_images(det: Detector, X: np.ndarray, explain: list[bool]) -> list[dict[str, Any]]:
    """X: float32 (N, 1, S, S) -> one result dict an image; a heat map (base64 PNG) where explain is set.

    `score` is the primary score (aae_ray.detector), which `p_value`, `threshold` and `anomaly` refer to; `t2` is
    Hotelling's T2 of the global latent code, `t2_local` the image's local T2 score (null where the family has no
    local map). The heat map is the detector's anomaly map: the local T2 map where there is one."""
    s = det.score(X, maps=any(explain))
    results = [{"score": _num(s.score[i]), "t2": _num(s.t2[i]), "t2_local": _num(s.t2_local[i]),
                "p_value": _num(s.p_value[i]), "threshold": _num(det.threshold_), "anomaly": bool(s.anomaly[i]),
                "recon_error": _num(s.recon_error[i])} for i in range(len(X))]
    for i, e in enumerate(explain):
        if e:
            results[i]["heatmap"], results[i]["heatmap_max"] = heatmap_png(s.maps[i])
    return results


def heatmap_png(amap: np.ndarray) -> tuple[str, float]:
    """An anomaly map (S, S) -> base64 gray PNG scaled so 255 is its maximum, and that maximum."""
    top = float(amap.max()) if amap.size else 0.0
    pixels = (amap / top * 255.0).round().astype(np.uint8) if top > 0 else np.zeros(amap.shape, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), top


def _num(x: Any) -> float | None:
    """JSON has no NaN or infinity."""
    x = float(x)
    return x if math.isfinite(x) else None


# Ray's workers take ports 10002-19999 by default; below the kernel's ephemeral range nothing that binds port 0
# (Ray's gRPC servers, its actors, a client) can take the port between this check and the caller's own bind.
_QUIET_PORTS = (20000, 32768)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _QUIET_PORTS[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, chosen where the system does not hand out ports of its own (CI once lost a test
    module to Ray's gRPC server taking an ephemeral port that had been free a moment before)."""
    low, high = _QUIET_PORTS[0], min(_QUIET_PORTS[1], _ephemeral_low())
    for port in random.sample(range(low, high), min(64, max(0, high - low))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range: let the system choose
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """ValueError naming the problem if host:port cannot be bound (out of range, in use, not our address)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

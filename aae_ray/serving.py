"""Scoring over HTTP, without the web framework: settings, request decoding and validation, the model a replica
holds (and reloads when a round is promoted), scoring and the JSON answers.

`serve/app.py` (Ray Serve) is a thin shell over `ScoringService.handle`; any ASGI server can be one too. Nothing
here imports Ray. The pixels go through `aae_ray.data.images.to_model_input`, the preprocessing of training and
of `aae-ray score`, so an image's T2 over HTTP equals its offline T2.

Status codes (DESIGN.md): 400 undecodable, empty or malformed input; 401 missing or wrong bearer token; 404 unknown
path; 405 wrong method; 413 body, image count or image pixels over the limits; 415 unsupported content type. Every
answer is JSON; errors are `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from python_multipart.multipart import MultipartParser, parse_options_header

from aae_ray import artifacts
from aae_ray.data.images import ImageTooLarge, to_model_input
from aae_ray.detector import Detector
from aae_ray.workspace import Workspace

log = logging.getLogger(__name__)
MiB = 1024 * 1024


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


class RequestError(Exception):
    """A request the endpoint refuses: an HTTP status and a message for `{"error": ...}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str | None = None  # the multipart filename, if any


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


# --- reading a request ----------------------------------------------------------------------------------------


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole body, refusing (413) a declared or actual size over `limit` before holding more than that."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"Content-Length is not a number: {content_length[:40]!r}") from None
        if declared > limit:
            raise RequestError(413, f"body of {declared:,} bytes is over the limit of {limit:,}")
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise RequestError(413, f"body is over the limit of {limit:,} bytes")
    return bytes(buf)


def decode_request(content_type: str | None, body: bytes, *, max_images: int) -> list[Upload]:
    """Multipart files, JSON `{"images": [base64, ...]}` or one raw image body -> the images' bytes."""
    ctype, params = parse_options_header(content_type or "")
    ctype_s = ctype.decode("latin-1")
    if not ctype_s:
        raise RequestError(415, "missing Content-Type: send multipart/form-data, application/json or image/*")
    if not body:
        raise RequestError(400, "empty body: no image")
    if ctype_s == "multipart/form-data":
        uploads = _multipart(body, params.get(b"boundary"), max_images)
    elif ctype_s == "application/json" or ctype_s.endswith("+json"):
        uploads = _json_images(body, max_images)
    elif ctype_s.startswith("image/") or ctype_s == "application/octet-stream":
        uploads = [Upload(body)]
    else:
        raise RequestError(415, f"unsupported Content-Type {ctype_s!r}: send multipart/form-data, "
                                "application/json or image/*")
    for i, up in enumerate(uploads):
        if not up.data:
            raise RequestError(400, f"image {i}{_named(up)} is empty")
    return uploads


def _json_images(body: bytes, max_images: int) -> list[Upload]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise RequestError(400, 'expected a JSON object {"images": ["<base64 PNG/JPEG>", ...]}')
    if not images:
        raise RequestError(400, '"images" is empty')
    _check_count(len(images), max_images)
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise RequestError(400, f"images[{i}] is a {type(item).__name__}, expected a base64 string")
        if item.startswith("data:") and "," in item:  # a data URI: data:image/png;base64,....
            item = item.split(",", 1)[1]
        try:
            out.append(Upload(base64.b64decode("".join(item.split()), validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"images[{i}] is not valid base64") from None
    return out


def _multipart(body: bytes, boundary: bytes | None, max_images: int) -> list[Upload]:
    if not boundary:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {}
    ended = []

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})
        if len(parts) > 2 * max_images + 16:  # form fields besides the files are ignored, but not without end
            raise RequestError(413, f"too many multipart parts (the limit is {max_images} images)")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def on_header_end() -> None:
        name = bytes(header.get("field", b"")).decode("latin-1").lower()
        parts[-1]["headers"][name] = bytes(header.get("value", b"")).decode("latin-1")
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(data[start:end])

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_part_data": on_part_data,
                 "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as exc:  # python-multipart raises its own error types for malformed bodies
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    if not ended:
        raise RequestError(400, "malformed multipart body: no closing boundary")
    files = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get("content-disposition"))
        if b"filename" in disp:
            files.append(Upload(bytes(part["data"]), disp[b"filename"].decode("utf-8", "replace")))
    if not files:
        raise RequestError(400, "multipart body has no file parts (send each image as a file)")
    _check_count(len(files), max_images)
    return files


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise RequestError(413, f"{n} images in one request; the limit is {max_images}")


def _named(up: Upload) -> str:
    return f" ({up.name})" if up.name else ""


def prepare(uploads: list[Upload], size: int, max_pixels: int) -> np.ndarray:
    """Images -> float32 (N, 1, size, size) model input, the training preprocessing; 400/413 name the image."""
    out = []
    for i, up in enumerate(uploads):
        try:
            out.append(to_model_input([up.data], size, max_pixels=max_pixels))
        except ImageTooLarge as exc:
            raise RequestError(413, f"image {i}{_named(up)}: {exc}") from None
        except ValueError as exc:  # PIL names its buffer object: noise to a client
            msg = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
            raise RequestError(400, f"image {i}{_named(up)}: {msg}") from None
    return np.concatenate(out)


def parse_flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"query parameter {name}={value[:20]!r}: expected true or false")


def check_token(authorization: str | None, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")


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
        hot = self.detector.hotelling_
        return {**self.summary(), "reason": self.reason, "threshold": _num(self.detector.threshold_),
                "threshold_method": hot.method, "alpha": hot.alpha, "device": self.device,
                "metrics": self.metrics, "config": self.detector.config.model_dump()}


def load_current(ws: Workspace, device: str = "cpu") -> LoadedModel:
    """The promoted model of `ws` (WorkspaceError if none, ArtifactError if broken), on `device`."""
    text = ws.current_path.read_text() if ws.current_path.exists() else ""
    cur = json.loads(text) if text else None
    if not isinstance(cur, dict) or "model" not in cur:
        raise ValueError(f"{ws.root} has no promoted model yet (run `aae-ray train {ws.root}` or `aae-ray tune`)")
    folder = ws.root / cur["model"]
    det = artifacts.load(folder).to(device)
    return LoadedModel(det, text, int(cur.get("round", -1)), cur["model"], cur.get("promoted_at"),
                       cur.get("reason"), artifacts.read_metrics(folder), device)


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
        self.model = load_current(self.ws, device)
        self.reload_error: str | None = None
        self._failed_pointer: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = {"images": 0, "batches": 0, "largest_batch": 0}  # this replica's, since it started

    # --- hot reload ---------------------------------------------------------------------------------------
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
            new = load_current(self.ws, self.device)
        except Exception as exc:  # a broken or half-copied artifact must not take the endpoint down
            self._failed_pointer, self.reload_error = text, f"{type(exc).__name__}: {exc}"
            log.error("keeping round %s: cannot load the promoted model: %s", self.model.round, self.reload_error)
            return False
        self.model, self.reload_error, self._failed_pointer = new, None, None
        log.info("now serving round %s (%s)", new.round, new.path)
        return True

    def start_watching(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.cfg.reload_interval_s):
                self.reload_if_changed()

        self._watcher = threading.Thread(target=loop, name="aae-ray-model-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    # --- requests ------------------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str],
                     body: AsyncIterator[bytes], score: ScoreFn) -> Reply:
        """One HTTP request -> a JSON reply. `score` scores one image (batched by the caller, or not)."""
        try:
            return await self._route(method, path.rstrip("/") or "/", headers, query, body, score)
        except RequestError as exc:
            return Reply(exc.status, {"error": exc.message})
        except Exception:  # a bug must cost one request, not the replica
            log.exception("unexpected error on %s %s", method, path)
            return Reply(500, {"error": "internal error (see the server log)"})

    async def _route(self, method, path, headers, query, body, score) -> Reply:
        routes = {"/health": "GET", "/model": "GET", "/score": "POST"}
        if path not in routes:
            raise RequestError(404, f"no such path {path[:80]!r}; paths: POST /score, GET /health, GET /model")
        if method != routes[path]:
            return Reply(405, {"error": f"{path} takes {routes[path]}"}, {"Allow": routes[path]})
        if path == "/health":
            body_out = {"status": "ok", "model": self.model.summary(), "batching": dict(self.stats)}
            return Reply(200, body_out | ({"reload_error": self.reload_error} if self.reload_error else {}))
        check_token(headers.get("authorization"), self.cfg.token)
        if path == "/model":
            return Reply(200, self.model.info() | {"reload_error": self.reload_error})
        explain = parse_flag(query.get("explain"), "explain")
        raw = await read_body(body, headers.get("content-length"), self.cfg.max_body_bytes)
        uploads = decode_request(headers.get("content-type"), raw, max_images=self.cfg.max_images)
        model = self.model  # this request is scored by the model current now, even if a reload lands meanwhile
        X = await asyncio.to_thread(prepare, uploads, model.size, self.cfg.max_pixels)
        results = await asyncio.gather(*(score(Item(model, X[i], explain, up.name)) for i, up in enumerate(uploads)))
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
    """X: float32 (N, 1, S, S) -> one result dict an image; a heat map (base64 PNG) where explain is set."""
    s = det.score(X)
    results = [{"t2": _num(s.t2[i]), "p_value": _num(s.p_value[i]), "threshold": _num(det.threshold_),
                "anomaly": bool(s.anomaly[i]), "recon_error": _num(s.recon_error[i])} for i in range(len(X))]
    wanted = [i for i, e in enumerate(explain) if e]
    if wanted:
        maps = det.anomaly_map(X[wanted])  # (k, S, S)
        for i, amap in zip(wanted, maps, strict=True):
            results[i]["heatmap"], results[i]["heatmap_max"] = heatmap_png(amap)
    return results


def heatmap_png(amap: np.ndarray) -> tuple[str, float]:
    """Squared reconstruction error (S, S) -> base64 gray PNG scaled so 255 is its maximum, and that maximum."""
    top = float(amap.max()) if amap.size else 0.0
    pixels = (amap / top * 255.0).round().astype(np.uint8) if top > 0 else np.zeros(amap.shape, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), top


def _num(x: Any) -> float | None:
    """JSON has no NaN or infinity."""
    x = float(x)
    return x if math.isfinite(x) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
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

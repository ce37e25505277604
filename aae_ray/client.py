"""A small client for the scoring endpoint (`aae-ray serve`); needs only requests, numpy and Pillow.

    from aae_ray.client import Client
    c = Client("http://127.0.0.1:8000", token=None)
    c.health()                                  # {"status": "ok", "model": {...}}
    c.model()                                   # round, metrics, threshold, config
    c.score(["a.png", "b.jpg"])                 # [{"t2": ..., "p_value": ..., "threshold": ..., "anomaly": ...}, ...]
    c.score(pixels, explain=True)               # uint8 or [0, 1] float arrays too; "heatmap" is a base64 PNG
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

ImageLike = str | Path | bytes | np.ndarray


class ServeError(RuntimeError):
    """The endpoint refused a request (`status`, its JSON `error`) or could not be reached (`status` None)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def model(self) -> dict[str, Any]:
        return self._call("GET", "/model")

    def score(self, images: ImageLike | Sequence[ImageLike], *, explain: bool = False) -> list[dict[str, Any]]:
        """One result per image, in order."""
        return self.score_response(images, explain=explain)["results"]

    def score_response(self, images: ImageLike | Sequence[ImageLike], *, explain: bool = False) -> dict[str, Any]:
        """The whole answer: {"model": {"round", "path", "promoted_at"}, "results": [...]}."""
        if isinstance(images, str | Path | bytes | np.ndarray):
            images = [images]
        files = [("file", (name, data, "application/octet-stream"))
                 for name, data in (_as_file(img, i) for i, img in enumerate(images))]
        params = {"explain": "true"} if explain else None
        return self._call("POST", "/score", files=files, params=params)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServeError(None, f"cannot reach {self.url}: {exc}") from exc
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else None
            raise ServeError(r.status_code, message or r.text[:200] or r.reason)
        return body


def _as_file(img: ImageLike, i: int) -> tuple[str, bytes]:
    if isinstance(img, str | Path):
        path = Path(img)
        return path.name, path.read_bytes()
    if isinstance(img, bytes):
        return f"image{i}", img
    return f"image{i}.png", encode_array(img)


def encode_array(pixels: np.ndarray) -> bytes:
    """(H, W), (H, W, 3) or (1, H, W) pixels, uint8 or float in [0, 1] -> PNG bytes."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected (H, W), (H, W, 3) or (1, H, W) pixels, got shape {np.asarray(pixels).shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()

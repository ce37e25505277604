"""What arrives over HTTP, decoded and checked: a body within its size limit, then the images of a multipart, JSON
(base64) or raw-image request, then model input through the training preprocessing. Every refusal is a
`RequestError(status, message)`; nothing here knows about a web framework or Ray."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from python_multipart.multipart import MultipartParser, parse_options_header

from aae_ray.data.images import ImageTooLarge, to_model_input


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


STATION = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


def parse_station(value: str | None) -> str | None:
    """`?station=` or `X-Station`: which camera or line sent the image, logged with its answer (None: unnamed)."""
    if value is None or value == "":
        return None
    if not STATION.fullmatch(value):
        raise RequestError(400, f"station must be 1-64 letters, digits or ._:/-, got {value[:80]!r}")
    return value


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

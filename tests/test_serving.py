"""The endpoint's logic without Ray (aae_ray.http_input, aae_ray.serving): decoding and limits, tokens, routes,
scoring, hot reload. tests/test_serve.py runs the same code behind a real Ray Serve."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import shutil
import struct
import zlib
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from aae_ray import artifacts, http_input, serving
from aae_ray.data.images import ImageTooLarge, decode_image, to_model_input
from aae_ray.http_api import http_api
from aae_ray.http_input import RequestError, decode_request, prepare
from aae_ray.workspace import Workspace


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A gray PNG that declares width x height pixels of zeros, sent as its header and a first IDAT chunk: all
    a decoder sees before it starts allocating (a whole one compresses ~1000:1, so it would still be small)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    first_rows = zlib.compressobj(9).compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", first_rows or b"x")


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[str, bytes]:
    body = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


GRAY = png(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64))


def status_of(content_type: str | None, body: bytes, max_images: int = 4) -> int:
    with pytest.raises(RequestError) as info:
        decode_request(content_type, body, max_images=max_images)
    assert info.value.message
    return info.value.status


# --- decoding ------------------------------------------------------------------------------------------------


def test_the_three_ways_to_send_images_give_the_same_bytes():
    ct, body = multipart([("file", "a.png", GRAY), ("note", None, b"ignored"), ("file", "b.png", GRAY)])
    files = decode_request(ct, body, max_images=4)
    assert [f.name for f in files] == ["a.png", "b.png"] and all(f.data == GRAY for f in files)
    b64 = base64.b64encode(GRAY).decode()
    as_json = decode_request("application/json", json.dumps({"images": [b64, "data:image/png;base64," + b64]}).encode(),
                             max_images=4)
    assert [u.data for u in as_json] == [GRAY, GRAY]
    assert [u.data for u in decode_request("image/png", GRAY, max_images=4)] == [GRAY]
    assert [u.data for u in decode_request("application/octet-stream", GRAY, max_images=4)] == [GRAY]


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("image/png", b"", 400),  # empty
    ("text/plain", b"hello", 415),  # unsupported type
    (None, GRAY, 415),  # no type at all
    ("application/json", b'{"images": [', 400),  # malformed JSON
    ("application/json", b"\xff\xfe", 400),  # not even text
    ("application/json", b'{"files": []}', 400),  # no "images"
    ("application/json", b'{"images": "abc"}', 400),  # not a list
    ("application/json", b'{"images": []}', 400),  # nothing to score
    ("application/json", b'{"images": [42]}', 400),  # not a string
    ("application/json", b'{"images": ["not base64!"]}', 400),  # bad base64
    ("application/json", json.dumps({"images": ["aGk="] * 5}).encode(), 413),  # 5 images, limit 4
    ("multipart/form-data", b"--x\r\n", 400),  # no boundary
    (multipart([("note", None, b"text")])[0], multipart([("note", None, b"text")])[1], 400),  # no file part
    ("multipart/form-data; boundary=XyZ", b"--XyZ\r\nContent-Disposition: form-data; name=f; filename=a\r\n\r\nab",
     400),  # never closed
    (multipart([("f", f"{i}.png", GRAY) for i in range(5)])[0],
     multipart([("f", f"{i}.png", GRAY) for i in range(5)])[1], 413),  # 5 files, limit 4
    (multipart([("f", "a.png", b"")])[0], multipart([("f", "a.png", b"")])[1], 400),  # an empty file
])
def test_bad_requests_get_their_status(content_type, body, status):
    assert status_of(content_type, body) == status


def test_the_body_limit_holds_with_and_without_a_content_length():
    async def chunks(n: int, size: int = 1000):
        for _ in range(n):
            yield b"x" * size

    def read(n: int, declared: str | None) -> bytes:
        return asyncio.run(http_input.read_body(chunks(n), declared, limit=5000))

    assert len(read(5, "5000")) == 5000
    for declared in ("5001", None):  # declared too large: refused before reading; undeclared: while reading
        with pytest.raises(RequestError) as info:
            read(6, declared)
        assert info.value.status == 413
    with pytest.raises(RequestError) as info:
        read(1, "lots")
    assert info.value.status == 400


def test_images_are_preprocessed_as_in_training_whatever_their_format():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    uploads = [http_input.Upload(GRAY), http_input.Upload(png(rgb)), http_input.Upload(buf.getvalue())]
    X = prepare(uploads, 32, max_pixels=10_000)
    assert X.shape == (3, 1, 32, 32) and X.dtype == np.float32
    np.testing.assert_array_equal(X, to_model_input([u.data for u in uploads], 32))


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_bomb(100_000, 100_000)  # 10 G pixels declared in a few hundred bytes
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, max_pixels=25_000_000)
    with pytest.raises(RequestError) as info:
        prepare([http_input.Upload(GRAY), http_input.Upload(bomb, "bomb.png")], 32, max_pixels=25_000_000)
    assert info.value.status == 413 and "image 1 (bomb.png)" in info.value.message
    with pytest.raises(RequestError) as info:  # one pixel over a small limit
        prepare([http_input.Upload(GRAY)], 32, max_pixels=64 * 48 - 1)
    assert info.value.status == 413
    assert decode_image(GRAY, max_pixels=64 * 48).shape == (48, 64)  # at the limit: decoded as always


@pytest.mark.parametrize("data", [b"garbage", GRAY[: len(GRAY) // 2]], ids=["not-an-image", "truncated-png"])
def test_undecodable_images_are_400_naming_the_image(data):
    with pytest.raises(RequestError) as info:
        prepare([http_input.Upload(GRAY), http_input.Upload(data, "x.png")], 32, max_pixels=10**6)
    assert info.value.status == 400 and info.value.message.startswith("image 1 (x.png):")
    assert "BytesIO" not in info.value.message


def test_tokens_and_flags():
    http_input.check_token(None, None)
    http_input.check_token("Bearer s3cret", "s3cret")
    http_input.check_token("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(RequestError) as info:
            http_input.check_token(header, "s3cret")
        assert info.value.status == 401
    assert http_input.parse_flag("true", "explain") and http_input.parse_flag("1", "explain")
    assert not http_input.parse_flag(None, "explain") and not http_input.parse_flag("false", "explain")
    with pytest.raises(RequestError):
        http_input.parse_flag("maybe", "explain")


def test_settings_are_validated_with_the_key_named(tmp_path):
    assert serving.settings(workspace="ws", replicas="2").replicas == 2  # `serve run` passes strings
    assert serving.settings(workspace="ws", replicas="auto").replicas == "auto"
    assert serving.settings(workspace="ws").workspace.is_absolute()
    with pytest.raises(ValueError, match="max_batch_size"):
        serving.settings(workspace="ws", max_batch_size=0)
    with pytest.raises(ValueError, match="colour"):
        serving.settings(workspace="ws", colour="red")


# --- the service: routes, scoring, reload ---------------------------------------------------------------------


def call(svc: serving.ScoringService, method: str, path: str, body: bytes = b"", headers=None, query=None):
    """One request through the real routes (aae_ray.http_api on FastAPI), as an ASGI server would make it: no
    network, no Ray. Returns the status, the JSON body and the headers."""
    api = http_api(lambda: (svc, svc.score_unbatched))
    hdrs = {"content-length": str(len(body)), **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": urlencode(query or {}).encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()], "server": ("test", 80),
             "client": ("test", 1)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    with contextlib.suppress(Exception):  # Starlette re-raises a route's bug after it has sent the 500
        asyncio.run(api(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return serving.Reply(start["status"], json.loads(payload),
                         {k.decode(): v.decode() for k, v in start["headers"]})


@pytest.fixture
def ws_served(trained_ws, tmp_path):
    dest = tmp_path / "ws"
    shutil.copytree(trained_ws, dest)
    return dest


def pool_images(ws_dir, n: int) -> list[bytes]:
    t = Workspace.open(ws_dir).images()
    return [img for img, s in zip(t.column("image").to_pylist(), t.column("split").to_pylist(), strict=True)
            if s == "pool"][:n]


def test_the_service_scores_like_the_detector_and_names_the_model(ws_served):
    svc = serving.ScoringService(serving.settings(workspace=ws_served, max_images=8))
    images = pool_images(ws_served, 3)
    ct, body = multipart([("file", f"{i}.png", img) for i, img in enumerate(images)])
    reply = call(svc, "POST", "/score", body, {"content-type": ct}, {"explain": "true"})
    assert reply.status == 200
    assert reply.body["model"]["round"] == 0 and reply.body["model"]["path"] == "rounds/r000/model"
    det = artifacts.load(Workspace.open(ws_served).model_dir(0))
    expected = det.score(to_model_input(images, det.config.input_size))
    got = reply.body["results"]
    np.testing.assert_allclose([r["t2"] for r in got], expected.t2, rtol=1e-5)
    assert [r["anomaly"] for r in got] == expected.anomaly.tolist()
    assert {r["threshold"] for r in got} == {det.threshold_}
    heat = Image.open(io.BytesIO(base64.b64decode(got[0]["heatmap"])))
    assert heat.size == (det.config.input_size, det.config.input_size) and got[0]["heatmap_max"] > 0


def test_routes_token_and_errors(ws_served):
    svc = serving.ScoringService(serving.settings(workspace=ws_served, token="s3cret"))
    auth = {"authorization": "Bearer s3cret", "content-type": "image/png"}
    image = pool_images(ws_served, 1)[0]
    assert call(svc, "GET", "/health").status == 200  # open, for load balancers
    assert call(svc, "GET", "/model").status == 401
    assert call(svc, "POST", "/score", image, {"content-type": "image/png"}).status == 401
    model = call(svc, "GET", "/model", headers=auth)
    assert model.status == 200 and model.body["round"] == 0 and model.body["config"]["input_size"] == 32
    assert "token" not in json.dumps(model.body)
    assert call(svc, "POST", "/score", image, auth).status == 200
    assert call(svc, "GET", "/score", headers=auth).status == 405
    assert call(svc, "GET", "/nowhere").status == 404
    assert call(svc, "POST", "/score", image, auth, {"explain": "perhaps"}).status == 400


def test_a_bug_while_scoring_is_a_500_and_the_next_request_is_answered(ws_served, monkeypatch):
    svc = serving.ScoringService(serving.settings(workspace=ws_served))
    image = pool_images(ws_served, 1)[0]
    monkeypatch.setattr(serving, "score_images", lambda *a: 1 / 0)
    reply = call(svc, "POST", "/score", image, {"content-type": "image/png"})
    assert reply.status == 500 and "error" in reply.body
    monkeypatch.undo()
    assert call(svc, "POST", "/score", image, {"content-type": "image/png"}).status == 200


def test_a_promoted_model_is_loaded_and_a_broken_one_skipped(ws_served):
    ws = Workspace.open(ws_served)
    svc = serving.ScoringService(serving.settings(workspace=ws_served))
    old = svc.model
    assert not svc.reload_if_changed()  # nothing changed
    shutil.copytree(ws.model_dir(0), ws.model_dir(1))
    ws.promote(1, "test")
    assert svc.reload_if_changed() and svc.model.round == 1 and svc.model is not old
    shutil.copytree(ws.model_dir(0), ws.model_dir(2))
    (ws.model_dir(2) / "weights.safetensors").write_bytes(b"not weights")
    ws.promote(2, "broken")
    assert not svc.reload_if_changed()  # keeps serving round 1, says why
    assert svc.model.round == 1 and "weights.safetensors" in svc.reload_error
    assert call(svc, "GET", "/health").body["reload_error"]
    assert not svc.reload_if_changed()  # not retried until current.json changes again
    ws.promote(0, "rollback")
    assert svc.reload_if_changed() and svc.model.round == 0 and svc.reload_error is None


def test_the_port_check_names_the_problem():
    port = serving.free_port()
    serving.check_port("127.0.0.1", port)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            serving.check_port("127.0.0.1", port)
    with pytest.raises(ValueError, match="1..65535"):
        serving.check_port("127.0.0.1", 70000)


def test_every_answer_is_logged_with_its_station_and_the_flagged_images_bytes(ws_served):
    from aae_ray.prediction_log import content_id, read_predictions

    svc = serving.ScoringService(serving.settings(workspace=ws_served, log_flush_interval_s=0.05))
    svc.start_logging()
    images = pool_images(ws_served, 6)
    ct, body = multipart([("file", f"{i}.png", img) for i, img in enumerate(images)])
    first = call(svc, "POST", "/score", body, {"content-type": ct}, {"station": "cam-2"})
    second = call(svc, "POST", "/score", images[0], {"content-type": "image/png", "x-station": "cam-3"})
    assert call(svc, "POST", "/score", images[0], {"content-type": "image/png"}, {"station": "no spaces"}).status == 400
    svc.stop()  # the last rows are written on the way out
    rows = read_predictions(Workspace.open(ws_served).predictions_dir).to_pylist()
    answers = [(r, img, "cam-2") for r, img in zip(first.body["results"], images, strict=True)]
    answers += [(second.body["results"][0], images[0], "cam-3")]
    assert len(rows) == len(answers) == 7
    by_key = {(r["name"], r["station"]): r for r in rows}
    for res, img, station in answers:
        row = by_key[(res["name"], station)]
        assert row["id"] == content_id(img) and row["score"] == res["score"] and row["t2"] == res["t2"]
        assert row["anomaly"] == res["anomaly"] and row["threshold"] == res["threshold"]
        assert row["round"] == 0 and row["model"] == "rounds/r000/model"
        assert row["image"] == (img if res["anomaly"] else None)


def test_logging_can_be_turned_off(ws_served):
    svc = serving.ScoringService(serving.settings(workspace=ws_served, log=False))
    svc.start_logging()
    assert call(svc, "POST", "/score", pool_images(ws_served, 1)[0], {"content-type": "image/png"}).status == 200
    svc.stop()
    assert not Workspace.open(ws_served).predictions_dir.exists()


def test_the_watcher_records_drift_alarms_and_health_shows_them(ws_served):
    import time

    from test_monitor import log_stream, shifted

    ws = Workspace.open(ws_served)
    log_stream(ws, shifted(50, 150, 2.5), station="cam-9")  # what earlier traffic left in the log
    svc = serving.ScoringService(serving.settings(workspace=ws_served, reload_interval_s=0.05, alarm_check_s=0.1))
    assert call(svc, "GET", "/health").body["alarms"] == {"count": 0, "latest": []}
    svc.start_watching()
    deadline = time.monotonic() + 20
    while not list(ws.alarms_dir.glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.stop()
    time.sleep(2.1)  # past the summary's cache
    alarms = call(svc, "GET", "/health").body["alarms"]
    assert alarms["count"] >= 1 and "station cam-9 round 0: drift up" in alarms["latest"][-1]

"""The endpoint behind a real Ray Serve on a free loopback port (serve/app.py over aae_ray.serving), and the
`aae-ray serve` command. One Serve for the module: an open application at / and a token-protected one at /secure,
both on a copy of the scored workspace whose round 1 is promoted by the last test, under load."""

from __future__ import annotations

import base64
import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from conftest import listening_on, run_cli, tiny_config
from PIL import Image
from test_serving import multipart, png_bomb

from aae_ray import artifacts, serving
from aae_ray.client import Client, ServeError
from aae_ray.data.images import to_model_input
from aae_ray.prediction_log import content_id, read_predictions
from aae_ray.train import train_round
from aae_ray.workspace import Workspace

TOKEN = "s3cret-token"
LIMITS = {"max_images": 8, "max_body_bytes": 256 * 1024, "max_pixels": 1_000_000}
TIMEOUT = 60  # seconds a request may take on a loaded 2-core machine


def pool(ws_dir) -> dict[str, bytes]:
    t = Workspace.open(ws_dir).images()
    return {i: img for i, img, s in zip(t.column("id").to_pylist(), t.column("image").to_pylist(),
                                        t.column("split").to_pylist(), strict=True) if s == "pool"}


def offline_t2(ws_dir, round_no: int, images: list[bytes]) -> np.ndarray:
    det = artifacts.load(Workspace.open(ws_dir).model_dir(round_no))
    return det.score(to_model_input(images, det.config.input_size)).t2


@pytest.fixture(scope="module")
def served(ray_local, scored_ws, tmp_path_factory):
    """(url, workspace): the open application at url (one replica), the token-protected one at url/secure
    (autoscaling). Round 1 exists (another seed) but is not promoted."""
    from ray import serve

    from serve import app as serve_app

    ws_dir = tmp_path_factory.mktemp("served") / "ws"
    shutil.copytree(scored_ws, ws_dir)
    train_round(Workspace.open(ws_dir), tiny_config(seed=1), round_no=1, echo=lambda _: None)
    app, port = serve_app, serving.free_port()
    common = {"workspace": ws_dir, "num_cpus": 0.5, "max_batch_size": 16, "reload_interval_s": 0.5, **LIMITS}
    try:
        app.start(serving.settings(**common, engine="torch"), port=port, name="open", route_prefix="/")
        app.start(serving.settings(**common, token=TOKEN, replicas="auto"), port=port, name="secure",
                  route_prefix="/secure")
        # the same model on ONNX Runtime (its export made by the replica as it starts)
        app.start(serving.settings(**{**common, "num_cpus": 0.25}, engine="onnx"), port=port,
                  name="onnx", route_prefix="/onnx")
        yield f"http://127.0.0.1:{port}", ws_dir
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def image(scored_ws) -> bytes:
    return next(iter(pool(scored_ws).values()))


def variants(png: bytes) -> dict[str, bytes]:
    """One pool image as PNG and JPEG, gray and RGB, at its size and at odd sizes."""
    gray = Image.open(io.BytesIO(png)).convert("L")
    out = {}
    for name, img in {"gray": gray, "rgb": gray.convert("RGB"), "odd": gray.resize((45, 31)),
                      "odd-rgb": gray.convert("RGB").resize((101, 77))}.items():
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            img.save(buf, format=fmt)
            out[f"{name}-{fmt.lower()}"] = buf.getvalue()
    return out


# --- scores ------------------------------------------------------------------------------------------------


def test_png_jpeg_gray_rgb_and_odd_sizes_score_as_offline(served, image):
    url, ws_dir = served
    images = variants(image)
    with Client(url) as client:
        answer = client.score_response(list(images.values())[:8])  # 8 images in one multipart request
    assert answer["model"] == {"round": 0, "path": "rounds/r000/model",
                               "promoted_at": Workspace.open(ws_dir).current()["promoted_at"]}
    np.testing.assert_allclose([r["t2"] for r in answer["results"]], offline_t2(ws_dir, 0, list(images.values())),
                               rtol=1e-5)


def test_the_pool_scores_over_http_equal_aae_ray_score(served):
    """`aae-ray score` wrote rounds/r000/scores.parquet; the endpoint gives every pool image the same scores.

    The p-values may differ by one calibration step where an image ties with a calibration score: this pool is
    presumed normal, so its images are among the training normals the limit came from (train_quantile), and a
    float's last bit, which another batch size may move, puts such an image on either side of its own score."""
    url, ws_dir = served
    offline = pq.read_table(Workspace.open(ws_dir).round_dir(0) / "scores.parquet").to_pylist()
    images = pool(ws_dir)
    ids = [r["id"] for r in offline]
    got = []
    for i in range(0, len(ids), 8):  # JSON with base64 images, 8 a request
        batch = [base64.b64encode(images[id_]).decode() for id_ in ids[i:i + 8]]
        r = requests.post(f"{url}/score", json={"images": batch}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        got += r.json()["results"]
    np.testing.assert_allclose([g["t2"] for g in got], [o["t2"] for o in offline], rtol=1e-5)
    np.testing.assert_allclose([g["score"] for g in got], [o["score"] for o in offline], rtol=1e-5)
    np.testing.assert_allclose([g["t2_local"] for g in got], [o["t2_local"] for o in offline], rtol=1e-5)
    det = artifacts.load(Workspace.open(ws_dir).current_model_dir())
    step = 1 / (len(det.limit_.calibration) + 1)
    assert np.abs(np.subtract([g["p_value"] for g in got], [o["p_value"] for o in offline])).max() <= step + 1e-12
    assert sum(g["anomaly"] != o["anomaly"] for g, o in zip(got, offline, strict=True)) <= 1


def test_multipart_json_and_raw_bodies_give_the_same_answer(served, image):
    url, _ = served
    ct, body = multipart([("file", "a.png", image), ("file", "b.png", image)])
    answers = [
        requests.post(f"{url}/score", data=body, headers={"Content-Type": ct}, timeout=TIMEOUT),
        requests.post(f"{url}/score", json={"images": [base64.b64encode(image).decode()] * 2}, timeout=TIMEOUT),
        requests.post(f"{url}/score", data=image, headers={"Content-Type": "image/png"}, timeout=TIMEOUT),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200]
    results = [r.json()["results"] for r in answers]
    assert [len(r) for r in results] == [2, 2, 1]
    assert [r["name"] for r in results[0]] == ["a.png", "b.png"]
    t2 = [x["t2"] for r in results for x in r]
    np.testing.assert_allclose(t2, t2[0], rtol=1e-5)
    assert set(results[0][0]) >= {"t2", "p_value", "threshold", "anomaly"}


def test_explain_adds_a_heat_map_png_at_the_model_input_size(served, image):
    url, _ = served
    with Client(url) as client:
        (plain,) = client.score(image)
        (explained,) = client.score(image, explain=True)
    assert "heatmap" not in plain
    heat = Image.open(io.BytesIO(base64.b64decode(explained["heatmap"])))
    assert heat.format == "PNG" and heat.size == (32, 32) and explained["heatmap_max"] > 0
    assert explained["t2"] == pytest.approx(plain["t2"], rel=1e-5)


def test_the_client_takes_paths_bytes_and_arrays_and_reports_errors(served, image, tmp_path):
    url, _ = served
    path = tmp_path / "part.png"
    path.write_bytes(image)
    pixels = np.asarray(Image.open(io.BytesIO(image)))
    with Client(url) as client:
        assert client.health()["status"] == "ok"
        assert client.model()["config"]["input_size"] == 32
        results = client.score([path, image, pixels, pixels / 255.0])
        assert [r["name"] for r in results] == ["part.png", "image1", "image2.png", "image3.png"]
        np.testing.assert_allclose([r["t2"] for r in results], results[0]["t2"], rtol=1e-5)
        with pytest.raises(ServeError) as info:
            client.score(b"not an image")
        assert info.value.status == 400 and "image 0" in info.value.message
    with pytest.raises(ServeError, match="401"):
        Client(f"{url}/secure").model()
    with pytest.raises(ServeError, match="cannot reach"):
        Client(f"http://127.0.0.1:{serving.free_port()}", timeout=5).health()


# --- bad input -----------------------------------------------------------------------------------------------


def _chunks(n: int):
    for _ in range(n):
        yield b"\0" * 65536


def _json(*images) -> dict:
    return {"json": {"images": list(images)}}


BAD = {  # name: (method, path, requests keyword arguments, status)
    "empty body": ("POST", "/score", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400),
    "not an image": ("POST", "/score", {"data": b"GIF89a nonsense", "headers": {"Content-Type": "image/gif"}}, 400),
    "truncated png": ("POST", "/score", {"data": "TRUNCATED", "headers": {"Content-Type": "image/png"}}, 400),
    "text/plain": ("POST", "/score", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415),
    "form-urlencoded (curl -d)": ("POST", "/score", {"data": {"a": "b"}}, 415),
    "no content type": ("POST", "/score", {"data": b"\x89PNG"}, 415),
    "malformed json": ("POST", "/score", {"data": b'{"images": [', "headers": {"Content-Type": "application/json"}},
                       400),
    "json without images": ("POST", "/score", {"json": {"files": ["x"]}}, 400),
    "json empty list": ("POST", "/score", _json(), 400),
    "json not a string": ("POST", "/score", _json(7), 400),
    "bad base64": ("POST", "/score", _json("%%% not base64 %%%"), 400),
    "base64 of text": ("POST", "/score", _json(base64.b64encode(b"just text").decode()), 400),
    "multipart without files": ("POST", "/score", {"data": {"field": "value"}, "files": {"x": (None, "text")}}, 400),
    "multipart never closed": ("POST", "/score", {"data": b"--B\r\nContent-Disposition: form-data; name=f; "
                                                          b"filename=a.png\r\n\r\nabc",
                                                  "headers": {"Content-Type": "multipart/form-data; boundary=B"}}, 400),
    "too many images": ("POST", "/score", {"files": [("f", (f"{i}.png", "IMAGE")) for i in range(9)]}, 413),
    "body over the limit": ("POST", "/score", {"data": b"\0" * (300 * 1024), "headers": {"Content-Type": "image/png"}},
                            413),
    "chunked body over the limit": ("POST", "/score", {"data": "CHUNKS", "headers": {"Content-Type": "image/png"}},
                                    413),
    "decompression bomb": ("POST", "/score", {"data": png_bomb(100_000, 100_000),
                                              "headers": {"Content-Type": "image/png"}}, 413),
    "too many pixels": ("POST", "/score", {"data": "BIG", "headers": {"Content-Type": "image/png"}}, 413),
    "bad explain flag": ("POST", "/score", {"data": "IMAGE", "params": {"explain": "perhaps"},
                                            "headers": {"Content-Type": "image/png"}}, 400),
    "GET /score": ("GET", "/score", {}, 405),
    "unknown path": ("GET", "/predict", {}, 404),
    "no token": ("POST", "/secure/score", {"data": "IMAGE", "headers": {"Content-Type": "image/png"}}, 401),
    "wrong token": ("GET", "/secure/model", {"headers": {"Authorization": "Bearer nope"}}, 401),
}


def _fill(value, image: bytes):
    """Placeholders that need the module's image (the table above is built at import)."""
    big = Image.new("L", (1001, 1000))  # 1,001,000 pixels: one row over the test limit
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    table = {"IMAGE": image, "TRUNCATED": image[: len(image) // 2], "CHUNKS": _chunks(5), "BIG": buf.getvalue()}
    if isinstance(value, str):
        return table.get(value, value)
    if isinstance(value, tuple):
        return tuple(_fill(v, image) for v in value)
    if isinstance(value, list):
        return [_fill(v, image) for v in value]
    return value


@pytest.mark.parametrize("engine", ["torch", "onnx"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_as_json_and_the_next_request_is_answered(served, image, case, engine):
    url, _ = served
    method, path, kwargs, status = BAD[case]
    if engine == "onnx":
        if path.startswith("/secure"):
            pytest.skip("the token cases belong to the token-protected application")
        url += "/onnx"
    kwargs = {k: _fill(v, image) for k, v in kwargs.items()}
    r = requests.request(method, url + path, timeout=TIMEOUT, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    good = requests.post(f"{url}/score", data=image, headers={"Content-Type": "image/png"}, timeout=TIMEOUT)
    assert good.status_code == 200 and len(good.json()["results"]) == 1


def test_the_token_guards_score_and_model_but_not_health(served, image):
    url, _ = served
    png = {"Content-Type": "image/png"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(f"{url}/secure/score", data=image, headers=png, timeout=TIMEOUT).status_code == 401
    assert requests.post(f"{url}/secure/score", data=image, headers=png | auth, timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{url}/secure/model", headers=auth, timeout=TIMEOUT).json()["round"] == 0
    assert requests.get(f"{url}/secure/health", timeout=TIMEOUT).status_code == 200
    assert requests.post(f"{url}/score", data=image, headers=png, timeout=TIMEOUT).status_code == 200  # no token set
    with Client(f"{url}/secure", token=TOKEN) as client:
        assert len(client.score(image)) == 1


# --- load and hot reload (last: it promotes round 1) ----------------------------------------------------------


def test_16_clients_x_50_requests_while_a_model_is_promoted_never_fail_and_are_all_logged(served):
    url, ws_dir = served
    ws = Workspace.open(ws_dir)
    images = list(pool(ws_dir).values())[:4]
    expected = {0: offline_t2(ws_dir, 0, images), 1: offline_t2(ws_dir, 1, images)}
    assert not np.allclose(expected[0], expected[1])  # the two rounds are told apart by their scores too
    done, halfway = [], threading.Event()
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with requests.Session() as s:
            for i in range(50):
                j = (k + i) % len(images)
                start = time.monotonic()
                try:
                    r = s.post(f"{url}/score?station=load", data=images[j], headers={"Content-Type": "image/png"},
                               timeout=TIMEOUT)
                    body = r.json()
                    ok = r.status_code == 200
                except Exception as exc:  # any failure counts
                    ok, body = False, {"error": repr(exc)}
                with lock:
                    if not ok:
                        errors.append(str(body)[:200])
                        continue
                    done.append((start, time.monotonic(), body["model"]["round"], j, body["results"][0]["t2"]))
                    if len(done) == 200:
                        halfway.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    assert halfway.wait(300), f"200 requests never finished: {errors[:3]}"
    ws.promote(1, "promoted under load")
    for t in threads:
        t.join(600)
    assert errors == []
    assert len(done) == 16 * 50
    for _, _, round_no, j, t2 in done:  # each answer's model is the model that scored it
        assert t2 == pytest.approx(expected[round_no][j], rel=1e-5)
    new = [end for _, end, round_no, _, _ in done if round_no == 1]
    assert new, "no response named the promoted round while the clients were running"
    assert all(round_no == 1 for start, _, round_no, _, _ in done if start > min(new))
    assert requests.get(f"{url}/model", timeout=TIMEOUT).json()["metrics"]["round"] == 1
    batching = requests.get(f"{url}/health", timeout=TIMEOUT).json()["batching"]
    assert 2 <= batching["largest_batch"] <= 16  # concurrent requests shared forward passes, up to max_batch_size
    assert batching["batches"] < batching["images"]
    # The prediction log holds exactly the 800 answers, each with the round and score it was answered with.
    answered = sorted((round_no, content_id(images[j]), t2) for _, _, round_no, j, t2 in done)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # written off the request path, once a flush interval
        table = read_predictions(ws.predictions_dir)
        logged = [r for r in table.select(["round", "id", "t2", "station"]).to_pylist() if r["station"] == "load"]
        if len(logged) >= len(answered):
            break
        time.sleep(0.5)
    assert sorted((r["round"], r["id"], r["t2"]) for r in logged) == answered


# --- the command -----------------------------------------------------------------------------------------------


def test_serve_refuses_bad_arguments_in_one_line(synthetic_ws, scored_ws, capsys):
    assert run_cli("serve", synthetic_ws) == 2  # nothing promoted yet
    assert "no promoted model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_cli("serve", scored_ws, "--replicas", "0")
    assert info.value.code == 2 and "number of replicas" in capsys.readouterr().err
    assert run_cli("serve", scored_ws, "--max-batch", "0") == 2
    assert "max_batch_size" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert run_cli("serve", scored_ws, "--port", s.getsockname()[1]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aae-ray: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@pytest.mark.slow
def descendant_names(pid: int) -> set[str]:
    """The command names of every process below `pid` (from /proc)."""
    return set(descendants(pid).values())


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every process below `pid` (from /proc)."""
    parent, name = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        p = int(stat.parent.name)
        name[p] = text[text.index("(") + 1 : text.rindex(")")]
        parent[p] = int(text[text.rindex(")") + 2 :].split()[1])
    below, found = {pid}, True
    while found:
        kids = {p for p, pp in parent.items() if pp in below} - below
        below |= kids
        found = bool(kids)
    return {p: name[p] for p in below - {pid}}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow  # starts Ray and Serve in a subprocess
def test_aae_ray_serve_answers_until_sigint_then_stops_cleanly(scored_ws, image, tmp_path):
    """The real command in its own process: its own local Ray, the token, a promotion reported, Ctrl-C."""
    ws = Workspace.open(shutil.copytree(scored_ws, tmp_path / "ws"))
    port = serving.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aae_ray.cli", "serve", str(ws.root), "--port", str(port),
                             "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_for(text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(text in line for line in lines), "".join(lines)

    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"serving round 0 of {ws.root.resolve()} at {url}")
        # The default ingress is Ray's HAProxy front end, and the endpoint listens on loopback only.
        assert "haproxy" in descendant_names(proc.pid)
        assert listening_on(port) == ["127.0.0.1"]
        with Client(url, token=TOKEN) as client:
            assert client.score(image)[0]["threshold"] > 0
        with pytest.raises(ServeError, match="401"):
            Client(url).score(image)
        shutil.copytree(ws.model_dir(0), ws.model_dir(1))
        ws.promote(1, "test")
        wait_for("round 1 was promoted", timeout=60)
        ours = descendants(proc.pid)  # its Ray: raylet, GCS, workers, HAProxy
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "shutting down" in out and "Traceback" not in out
    # Serve's replicas no longer hold a 30 s drain for outside load balancers on the way out (serve/app.py).
    assert "Controller failed to shut down" not in out
    deadline = time.monotonic() + 10  # Ray's daemons exit on the driver's word, a moment after it
    while (left := {p: n for p, n in ours.items() if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of `aae-ray serve` still alive 10 s after it exited: {left}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


def test_deployment_options_batch_scale_and_place_replicas(ray_local, tmp_path):
    """Batches can fill (max_ongoing_requests = 2 x batch); auto scales 1..CPUs/num_cpus at half a batch in flight
    a replica; a replica takes a whole GPU when asked for one (or, with device auto, when the cluster has GPUs)."""
    from serve import app as serve_app

    options = serve_app.deployment_options
    fixed = options(serving.settings(workspace=tmp_path, replicas=3, max_batch_size=32))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 64
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}  # ray_local has no GPU
    auto = options(serving.settings(workspace=tmp_path, replicas="auto", max_batch_size=32, num_cpus=0.5))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                         "target_ongoing_requests": 16, "upscale_delay_s": 5.0,
                                         "downscale_delay_s": 60.0}
    assert options(serving.settings(workspace=tmp_path, device="cuda"))["ray_actor_options"]["num_gpus"] == 1

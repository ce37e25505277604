"""Serving benchmark (issue 5): Ray Serve, batching on and off, against a bare FastAPI + uvicorn process.

For each image size (32x32, 128x128) a workspace gets a model trained for one epoch at that input size (the
benchmark measures serving, not accuracy). Three servers then serve it at once on loopback:
- `serve`, batching on: `aae-ray serve`'s application (`serve/app.py`), `@serve.batch` up to 32 images;
- `serve`, batching off: the same application with a batch of 1;
- `bare`: one uvicorn process running the same FastAPI app (`aae_ray.http_api`) over the same
  `aae_ray.serving.ScoringService` (the same model loading, request decoding, preprocessing and scoring), one image
  scored per forward pass.
Each gets the same torch thread count. A load generator in a separate process keeps C clients (threads with
keep-alive connections) posting one PNG each (a raw `image/png` body) for --seconds; it counts requests, errors
(anything but 200) and latencies. Every (server, clients, size) cell is measured --repeats times, the servers
taking turns, and the table reports the medians.

    python bench/serve_load.py [--sizes 32 128] [--clients 1 8 32] [--seconds 5] [--repeats 3]

Targets (this 2-core machine): with batching at 32 clients, throughput >= 1.0x the bare server and p99 <= 100 ms
for 32x32.
"""


import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)

THREADS = 2  # torch threads for every server: the machine's cores


# --- the bare baseline: FastAPI + uvicorn over the same ScoringService ------------------------------------------


def bare_server(workspace: str, port: int) -> None:
    import torch
    import uvicorn

    from aae_ray.http_api import http_api
    from aae_ray.serving import ScoringService, settings

    torch.set_num_threads(THREADS)
    service = ScoringService(settings(workspace=workspace, num_cpus=THREADS))
    service.start_logging()  # what a Serve replica does: the same work a request
    api = http_api(lambda: (service, service.score_unbatched))  # Serve's routes, one image a forward pass
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


# --- the load generator (its own process, so its threads do not share the driver's interpreter) ---------------


def load(url: str, clients: int, seconds: float, image: bytes) -> dict:
    host, port_path = url.removeprefix("http://").split(":", 1)
    port, _, path = port_path.partition("/")
    path = "/" + path
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Event()
    deadline = [0.0]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        start.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=image, headers={"Content-Type": "image/png"})
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and b'"t2"' in body
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            if ok:
                latencies[i].append(time.perf_counter() - t0)
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = sorted(x for per in latencies for x in per)
    q = (lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    return {"requests": len(lat), "rps": len(lat) / elapsed, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "errors": sum(errors)}


def run_load(url: str, clients: int, seconds: float, image_path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--load", url, str(clients), str(seconds), str(image_path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the driver -------------------------------------------------------------------------------------------------


def make_workspace(root: Path, size: int) -> tuple[Path, Path]:
    """A synthetic workspace with a one-epoch model at `size`, and one of its pool images as a PNG file."""
    from aae_ray import cli
    from aae_ray.workspace import Workspace

    ws = root / f"ws{size}"
    assert cli.main(["init", str(ws), "--source", "synthetic", "--n-normal", "300", "--n-defect", "30",
                     "--size", str(size)]) == 0
    assert cli.main(["train", str(ws), "--epochs", "1", "--no-progress", f"--set=input_size={size}"]) == 0
    table = Workspace.open(ws).images()
    pool = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "pool"]
    image = root / f"image{size}.png"
    image.write_bytes(table.column("image")[pool[0]].as_py())
    return ws, image


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server at {url} exited") from None
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy in {timeout} s")


def markdown(doc: dict) -> str:
    lines = ["# Serving under load (`python bench/serve_load.py`)", "", f"Machine: {doc['machine']}  ",
             f"Code: {doc['commit']}, {doc['seconds']} s. One PNG a request (raw `image/png` body), "
             f"{doc['settings']['seconds']} s a cell, medians of {doc['settings']['repeats']} runs taken in turns; "
             f"the load generator runs on the same 2 cores. Torch threads per server: {THREADS}. Each Serve "
             "ingress ran in its own Ray session with the bare server beside it (`phase`).", "",
             "| phase | image | clients | server | ingress | engine | batching | req/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['phase']} | {r['image_size']}x{r['image_size']} | {r['clients']} | {r['server']} | "
                     f"{r['ingress']} | {r.get('engine', 'torch')} | {'on' if r['batching'] else 'off'} | "
                     f"{r['rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} |")
    lines += ["", "Targets: with batching at 32 clients, throughput >= 1.0x the bare server and p99 <= 100 ms "
              "(32x32).", ""]
    for t in doc["targets"].values():
        lines.append(f"- {t['ingress']} ingress, {t['image_size']}x{t['image_size']}, 32 clients: serve "
                     f"(batching) / bare throughput = **{t['throughput_ratio']:.2f}**, serve p99 = "
                     f"**{t['p99_ms']:.1f} ms**")
    return "\n".join(lines) + "\n"


def phase(ingress: str, sizes: list[int], clients_list: list[int], seconds: float, repeats: int,
          engines: tuple[str, ...] = ("torch",)) -> list[dict]:
    """One Ray session with one Serve ingress: every cell of the servers, `repeats` times, in turns. Each engine
    after the first (`--engines torch onnx`) adds a batching Serve deployment scoring on it."""
    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aae_ray.serving import free_port, settings
    from serve.app import start

    cells = []
    # Logical CPUs for the deployments, THREADS each (a replica's torch threads = its CPUs): they share the
    # machine's real cores, and only one of them is under load at a time.
    ray.init(address="local", num_cpus=(1 + len(engines)) * THREADS, include_dashboard=False, log_to_driver=False)
    serve_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            ws, image = make_workspace(Path(tmp), size)
            servers, names = {}, []
            for batching, max_batch, engine in ((True, 32, engines[0]), (False, 1, engines[0]),
                                                *((True, 32, e) for e in engines[1:])):
                prefix = f"/s{size}{'on' if batching else 'off'}{'' if engine == 'torch' else engine}"
                start(settings(workspace=ws, max_batch_size=max_batch, num_cpus=THREADS, engine=engine),
                      port=serve_port, name=prefix.strip("/"), route_prefix=prefix)
                servers[("serve", batching, engine)] = f"http://127.0.0.1:{serve_port}{prefix}"
                names.append(prefix.strip("/"))
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(ws), str(bare_port)])
            servers[("bare", False, "torch")] = f"http://127.0.0.1:{bare_port}"
            try:
                for (server, _, _), url in servers.items():
                    wait_healthy(url, bare if server == "bare" else None)
                    run_load(url + "/score", 4, 1.0, image)  # warm-up: first batches, lazy imports
                for rep in range(repeats):
                    for clients in clients_list:
                        for (server, batching, engine), url in servers.items():
                            r = run_load(url + "/score", clients, seconds, image)
                            cells.append({"server": server, "ingress": ingress if server == "serve" else "uvicorn",
                                          "batching": batching, "engine": engine, "clients": clients,
                                          "image_size": size, **r})
                            print(f"[{ingress}] {size}x{size} rep {rep + 1} {server:5} {engine:5} batching "
                                  f"{'on ' if batching else 'off'} {clients:2} clients: {r['rps']:7.1f} req/s "
                                  f"p50 {r['p50_ms']:6.1f} ms p99 {r['p99_ms']:6.1f} ms errors {r['errors']}",
                                  file=sys.stderr, flush=True)
            finally:
                bare.terminate()
                bare.wait(timeout=30)
                for name in names:
                    serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    return cells


def summarise(cells: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        key = (c["ingress"] if c["server"] == "serve" else c["phase"], c["server"], c["batching"],
               c.get("engine", "torch"), c["clients"], c["image_size"])
        groups.setdefault(key, []).append(c)
    rows = []
    for runs in groups.values():
        c = runs[0]
        rows.append({"server": c["server"], "ingress": c["ingress"], "phase": c["phase"], "batching": c["batching"],
                     "engine": c.get("engine", "torch"),
                     "clients": c["clients"], "image_size": c["image_size"],
                     **{k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")},
                     "errors": sum(r["errors"] for r in runs), "runs": [
                         {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")} for r in runs]})
    return sorted(rows, key=lambda r: (r["phase"], r["image_size"], r["clients"], r["server"] == "bare",
                                       not r["batching"], r["engine"] != "torch"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ingress", nargs="+", default=["haproxy", "python"], choices=["haproxy", "python"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "onnx"],
                    help="scoring engines of the batching Serve deployment (torch first: the others are added)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from serve.app import ingress_env

    t_start = time.perf_counter()
    cells, envs = [], {}
    for ingress in args.ingress:  # a fresh process each: Serve reads these variables once, when it starts
        envs[ingress] = ingress_env(ingress)
        out = subprocess.run([sys.executable, __file__, "--phase", ingress, json.dumps(vars(args), default=str)],
                             env={**os.environ, **envs[ingress]}, stdout=subprocess.PIPE, text=True, check=True)
        cells += [{**c, "phase": ingress} for c in json.loads(out.stdout.strip().splitlines()[-1])]
    rows = summarise(cells)
    targets = {}
    for ingress in args.ingress:
        for size in args.sizes:
            pick = [r for r in rows if r["phase"] == ingress and r["image_size"] == size
                    and r["clients"] == max(args.clients)]
            on = next((r for r in pick if r["server"] == "serve" and r["batching"] and r["engine"] == "torch"), None)
            bare = next((r for r in pick if r["server"] == "bare"), None)
            if on and bare:
                targets[f"{ingress} {size}"] = {"ingress": ingress, "image_size": size, "p99_ms": on["p99_ms"],
                                                "throughput_ratio": on["rps"] / bare["rps"]}
    doc = {"machine": machine(), "commit": COMMIT, "seconds": round(time.perf_counter() - t_start),
           "settings": {"seconds": args.seconds, "repeats": args.repeats, "torch_threads": THREADS,
                        "max_batch_size": 32, "request": "one PNG, raw image/png body",
                        "ingress_env": envs},
           "rows": rows, "targets": targets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "serve_load.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-server":
        os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
        bare_server(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--phase":
        opts = json.loads(sys.argv[3])
        print(json.dumps(phase(sys.argv[2], opts["sizes"], opts["clients"], opts["seconds"], opts["repeats"],
                               tuple(opts.get("engines", ["torch"])))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        url, clients, seconds, image = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
        print(json.dumps(load(url, clients, seconds, image.read_bytes())))
    else:
        main()

"""Prediction log benchmark (issue 17): does every answer of `aae-ray serve` land in WS/predictions/ once, what
does a killed replica lose, and what does logging cost the line?

A synthetic workspace gets a model trained for one epoch at 32x32 (bench/serve_load.py's `make_workspace`: the
benchmark measures the log, not accuracy). Each Serve part runs in its own process and Ray session with Serve's
HAProxy ingress, as `aae-ray serve` starts it, serving `serve/app.py`'s application (one replica, batching up to
32, logging on with the default `log_images="flagged"`) on loopback:
- `load`: 16 client threads x 50 requests, every request a different PNG (a pool image with seeded noise and its
  index in three pixels, so every content id differs), posted with `?station=bench`. Serve is then shut down
  cleanly (the replica's last flush), the log read with `aae_ray.prediction_log.read_predictions`, and each row
  matched to an answer by content id and score (relative 1e-9). `lost_rows` = 800 - matched rows; duplicate ids
  and rows no answer had are counted too.
- `kill`: the same application with `log_flush_interval_s` 1.0; clients post distinct images continuously; after
  a few seconds the replica's worker process (the Ray worker titled `ray::ServeReplica:...`) is SIGKILLed, Serve
  starts a new replica and the clients go on until 200 answers came back after the kill (errors while it restarts
  are counted apart), then Serve stops cleanly. Every fragment in WS/predictions must read with
  `pyarrow.parquet.read_table` (`corrupt_fragments`); `lost_rows_after_kill` = answered ids not in the log, against
  one flush interval's worth: the answers of the last `flush_interval_s` before the kill plus the requests in
  flight (one a client), what the killed replica's unwritten buffer can hold.
- `throughput`: 32 clients, one PNG a request (the same one; raw `image/png` body), bench/serve_load.py's load
  generator (`load`, in its own process), the application with logging on and with logging off (`log=False`)
  deployed side by side and measured in turns, --repeats runs of --seconds each; the ratio of the medians.
- `run_lengths`: the drift chart's run lengths, designed against measured (bench/chart_runs.py), no server.

    python bench/line.py [--seconds 10] [--repeats 3] [--parts load,kill,throughput,run_lengths] [--out DIR]
                         [--merge]

Targets (this 2-core machine): `lost_rows` = 0 with no duplicates; after a SIGKILL no corrupt fragment and
`lost_rows_after_kill` <= one flush interval's answers (+ those in flight); throughput with logging on >= 0.97x
logging off (32 clients, 32x32).
"""

import argparse
import http.client
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)
from serve_load import THREADS, make_workspace, run_load, wait_healthy  # noqa: E402  (serve_load.load runs there)

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("load", "kill", "throughput", "run_lengths")
SERVE_PARTS = ("load", "kill", "throughput")
SIZE = 32
LOAD_CLIENTS, LOAD_REQUESTS = 16, 50
KILL_CLIENTS, KILL_AFTER_S, KILL_ANSWERS_AFTER, KILL_RECOVERY_TIMEOUT_S = 16, 5.0, 200, 180.0
RATE_WINDOW_S = 3.0  # the throughput the kill bound uses: answers in this window before the kill
THROUGHPUT_CLIENTS = 32
SCORE_KEYS = ("score", "t2", "p_value", "anomaly")


# --- distinct images and the clients that post them --------------------------------------------------------------


class DistinctImages:
    """PNG i: pool image i mod n with seeded noise (+-2 gray levels) and i written into its first three pixels, so
    no two indices give the same bytes (content id)."""

    def __init__(self, ws: Path):
        import numpy as np
        from PIL import Image

        from aae_ray.workspace import Workspace

        table = Workspace.open(ws).images()
        pool = [b.as_py() for b, s in zip(table.column("image"), table.column("split"), strict=True)
                if s.as_py() == "pool"]
        self.bases = [np.asarray(Image.open(io.BytesIO(b))) for b in pool]

    def __call__(self, i: int) -> bytes:
        import numpy as np

        from aae_ray.data.images import encode_png

        base = self.bases[i % len(self.bases)]
        noise = np.random.default_rng(i).integers(-2, 3, base.shape)
        pixels = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        flat = pixels.reshape(-1)
        flat[:3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        return encode_png(pixels)


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> dict | None:
    """One POST of a raw PNG; its results[0], or None for anything but a 200 with a result."""
    conn.request("POST", path, body=body, headers={"Content-Type": "image/png"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return None
    results = json.loads(data).get("results") or [None]
    return results[0]


def client_loop(url: str, next_index, images: DistinctImages, answers: list, errors: list) -> None:
    """Post images while `next_index()` gives an index (None: stop); every answer and error lands in the lists,
    with the time it came back."""
    from aae_ray.prediction_log import content_id

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        while (i := next_index()) is not None:
            body = images(i)
            try:
                r = post(conn, "/score?station=bench", body)
            except (OSError, http.client.HTTPException):
                r = None
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            if r is None:
                errors.append(time.time())
                time.sleep(0.05)  # a replica restarting: do not spin the 2 cores it needs
                continue
            answers.append({"id": content_id(body), "index": i, "t": time.time(), **{k: r.get(k) for k in SCORE_KEYS}})
    finally:
        conn.close()


def run_clients(url: str, clients: int, next_index_for, images: DistinctImages) -> tuple[list, list,
                                                                                       list[threading.Thread]]:
    answers: list[dict] = []  # list.append is atomic: the threads share these
    errors: list[float] = []
    threads = [threading.Thread(target=client_loop, args=(url, next_index_for(c), images, answers, errors))
               for c in range(clients)]
    for t in threads:
        t.start()
    return answers, errors, threads


# --- reading the log back ------------------------------------------------------------------------------------------


def same(a, b, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def check_log(ws: Path, answers: list[dict]) -> dict:
    """The log against the answers: rows, rows matching an answer (content id and score), duplicate ids, rows no
    answer had, answered ids missing, and the other fields (t2, p_value, anomaly, station) that differ."""
    import pyarrow.parquet as pq

    from aae_ray.prediction_log import read_predictions
    from aae_ray.workspace import Workspace

    folder = Workspace.open(ws).predictions_dir
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    corrupt = []
    for p in files:
        try:
            pq.read_table(p)
        except Exception as exc:  # noqa: BLE001  (any unreadable file is what is counted)
            corrupt.append(f"{p.name}: {type(exc).__name__}: {exc}")
    if corrupt:  # read_predictions refuses a folder with an unreadable file: the readable ones, then
        good = [p for p in files if not any(c.startswith(p.name + ":") for c in corrupt)]
        rows = [r for p in good for r in pq.read_table(p).to_pylist()]
    else:
        rows = read_predictions(folder).to_pylist()
    by_id = {a["id"]: a for a in answers}
    seen: dict[str, int] = {}
    matched = unanswered = field_mismatches = wrong_station = 0
    for row in rows:
        seen[row["id"]] = seen.get(row["id"], 0) + 1
        a = by_id.get(row["id"])
        if a is None:
            unanswered += 1
            continue
        if seen[row["id"]] == 1 and same(row["score"], a["score"]):
            matched += 1
            field_mismatches += not all(same(row[k], a[k]) for k in ("t2", "p_value", "anomaly"))
        wrong_station += row["station"] != "bench"
    missing = [a for a in answers if a["id"] not in seen]
    temp = [p.name for p in folder.glob(".*")] if folder.is_dir() else []  # a write a kill cut short
    return {"fragments": len(files), "corrupt_fragments": len(corrupt), "corrupt": corrupt, "temp_files_left": temp,
            "rows": len(rows), "answers": len(answers), "distinct_answered_ids": len(by_id), "matched": matched,
            "duplicates": sum(n - 1 for n in seen.values()), "rows_without_answer": unanswered,
            "field_mismatches": field_mismatches, "wrong_station": wrong_station, "missing": missing}


# --- the Serve parts (each in its own process and Ray session) ----------------------------------------------------


def deploy(ws: Path, name: str, route_prefix: str = "/", port: int | None = None, **values) -> str:
    """serve/app.py's application on the running Ray, as bench/serve_load.py deploys it; returns its URL."""
    from aae_ray.serving import free_port, settings
    from serve.app import start

    port = port or free_port()
    start(settings(workspace=ws, num_cpus=THREADS, **values), port=port, name=name, route_prefix=route_prefix)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(url)
    return url


def clear_log(ws: Path) -> None:
    from aae_ray.workspace import Workspace

    folder = Workspace.open(ws).predictions_dir
    for p in folder.glob("*") if folder.is_dir() else ():
        p.unlink()


def part_load(ws: Path, opts: dict) -> dict:
    from ray import serve

    clear_log(ws)
    url = deploy(ws, "line")
    images = DistinctImages(ws)
    say(f"load: {LOAD_CLIENTS} clients x {LOAD_REQUESTS} distinct images at {url}")

    def indices(c: int):
        it = iter(range(c * LOAD_REQUESTS, (c + 1) * LOAD_REQUESTS))
        return lambda: next(it, None)

    t0 = time.perf_counter()
    answers, errors, threads = run_clients(url, LOAD_CLIENTS, indices, images)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    say(f"load: {len(answers)} answers, {len(errors)} errors in {elapsed:.1f} s; shutting Serve down")
    t1 = time.perf_counter()
    serve.shutdown()
    shutdown_s = time.perf_counter() - t1
    log = check_log(ws, answers)
    sent = LOAD_CLIENTS * LOAD_REQUESTS
    out = {"requests": sent, "errors": len(errors), "answers_per_s": len(answers) / elapsed,
           "shutdown_s": shutdown_s, **{k: v for k, v in log.items() if k != "missing"},
           "lost_rows": sent - log["matched"], "missing_ids": [a["id"] for a in log["missing"]][:20]}
    say(f"load: {out['rows']} rows, {out['matched']} matched, lost {out['lost_rows']}, duplicates "
        f"{out['duplicates']}, corrupt fragments {out['corrupt_fragments']}")
    return out


def replica_pids(app: str) -> list[int]:
    """Our Ray's Serve replicas of `app`: descendants of this process (the driver started that Ray) titled
    `ray::ServeReplica:<app>:...` (psutil ships inside Ray)."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

    # isort: split
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if f"ServeReplica:{app}:" in title:
            found.append(p.pid)
    return found


def part_kill(ws: Path, opts: dict) -> dict:
    from ray import serve

    flush_s = 1.0
    clear_log(ws)
    url = deploy(ws, "line", log_flush_interval_s=flush_s)
    images = DistinctImages(ws)
    counter, lock, stop = [0], threading.Lock(), threading.Event()

    def next_index():
        with lock:
            counter[0] += 1
            return None if stop.is_set() else counter[0]

    say(f"kill: {KILL_CLIENTS} clients posting distinct images at {url}; SIGKILL of the replica after "
        f"{KILL_AFTER_S:.0f} s")
    answers, errors, threads = run_clients(url, KILL_CLIENTS, lambda _: next_index, images)
    try:
        time.sleep(KILL_AFTER_S)
        pids = replica_pids("line")
        if len(pids) != 1:
            raise RuntimeError(f"expected one ServeReplica:line process, found {pids}")
        t_kill = time.time()
        os.kill(pids[0], signal.SIGKILL)
        say(f"kill: SIGKILL sent to the replica's worker, pid {pids[0]}, after {len(answers)} answers")
        deadline = time.monotonic() + KILL_RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline and sum(a["t"] > t_kill for a in list(answers)) < KILL_ANSWERS_AFTER:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [a for a in answers if a["t"] > t_kill]
    first_after = min((a["t"] for a in after), default=None)
    new_pids = replica_pids("line")
    say(f"kill: {len(after)} answers after the kill (first {first_after - t_kill:.1f} s after it), new replica "
        f"{new_pids}, {len(errors)} errors; shutting Serve down" if first_after else
        f"kill: no answer within {KILL_RECOVERY_TIMEOUT_S:.0f} s of the kill; shutting Serve down")
    serve.shutdown()
    log = check_log(ws, answers)
    rate = sum(t_kill - RATE_WINDOW_S <= a["t"] <= t_kill for a in answers) / RATE_WINDOW_S
    lost = len({a["id"] for a in log["missing"]})
    folder = ws / "predictions"
    before = [p.stat().st_mtime for p in folder.glob("f-*.parquet") if p.stat().st_mtime <= t_kill]
    out = {"flush_interval_s": flush_s, "killed_pid": pids[0], "new_replica_pids": new_pids,
           "answers": len(answers), "answers_before_kill": len(answers) - len(after), "answers_after_kill": len(after),
           "recovered": len(after) >= KILL_ANSWERS_AFTER,
           "recovery_s": None if first_after is None else first_after - t_kill,
           "errors": len(errors), "errors_after_kill": sum(t > t_kill for t in errors),
           "answers_per_s_before_kill": rate, "lost_rows_after_kill": lost,
           "lost_answered_before_kill": sum(a["t"] <= t_kill for a in log["missing"]),
           "lost_answered_after_kill": sum(a["t"] > t_kill for a in log["missing"]),
           # one flush interval's worth: what was answered in the last interval before the kill, plus the
           # requests in flight (one a client), whose rows were recorded as the kill landed
           "bound": sum(t_kill - flush_s <= a["t"] <= t_kill for a in answers) + KILL_CLIENTS,
           "bound_from_rate": flush_s * rate,
           # what the bound leaves out: the rate just before the kill, and how old the oldest lost answer and
           # the last fragment written before the kill were (a kill during a write loses the rows being written
           # too, so the window can reach flush_interval_s plus a write)
           "answers_in_last_interval_before_kill": sum(t_kill - flush_s <= a["t"] <= t_kill for a in answers),
           "oldest_lost_answer_age_s": max((t_kill - a["t"] for a in log["missing"]), default=None),
           "last_fragment_age_at_kill_s": t_kill - max(before) if before else None,
           **{k: v for k, v in log.items() if k not in ("missing", "answers")}}
    out["within_bound"] = lost <= out["bound"]
    say(f"kill: lost {lost} answered rows (bound {out['bound']}: answered in the last {flush_s} s + in flight), "
        f"{out['corrupt_fragments']} corrupt of {out['fragments']} fragments, duplicates {out['duplicates']}")
    return out


def part_throughput(ws: Path, opts: dict, image: Path) -> dict:
    from aae_ray.serving import free_port

    port = free_port()
    urls = {"on": deploy(ws, "logon", "/on", port), "off": deploy(ws, "logoff", "/off", port, log=False)}
    for url in urls.values():
        run_load(url + "/score", 4, 1.0, image)  # warm-up: first batches, lazy imports
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(opts["repeats"]):
        for logging in ("on", "off") if rep % 2 == 0 else ("off", "on"):  # in turns, each first in every other
            r = run_load(urls[logging] + "/score", THROUGHPUT_CLIENTS, opts["seconds"], image)
            runs[logging].append(r)
            say(f"throughput rep {rep + 1} logging {logging:3}: {r['rps']:7.1f} req/s p50 {r['p50_ms']:6.1f} ms "
                f"p99 {r['p99_ms']:6.1f} ms errors {r['errors']}")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p99_ms")} for k, v in runs.items()}
    return {"clients": THROUGHPUT_CLIENTS, "image_size": SIZE, "seconds": opts["seconds"], "repeats": opts["repeats"],
            "on": med["on"], "off": med["off"], "throughput_ratio": med["on"]["rps"] / med["off"]["rps"],
            "errors": sum(r["errors"] for v in runs.values() for r in v), "runs": runs}


def part_process(name: str, ws: Path, image: Path, opts: dict) -> dict:
    """One Serve part in this process's own Ray (the HAProxy ingress's variables are in our environment); every
    Ray and Serve process is stopped at the end, whatever happened."""
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    ray.init(address="local", num_cpus=2 * THREADS, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        if name == "throughput":
            out = part_throughput(ws, opts, image)
        else:
            out = {"load": part_load, "kill": part_kill}[name](ws, opts)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return {**out, "wall_s": round(time.perf_counter() - t0), "commit": COMMIT}


# --- run lengths (no server) ----------------------------------------------------------------------------------------


def run_lengths() -> dict:
    """The drift chart's run lengths, designed against measured (bench/chart_runs.py: simulated streams, aae-ray's
    normal scores over calibration sets, and a planted brightness drift through a trained detector)."""
    import chart_runs

    return chart_runs.run_lengths()


# --- the driver ----------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def markdown(doc: dict) -> str:
    lines = ["# The prediction log under load (`python bench/line.py`)", "", f"Machine: {doc['machine']}  ",
             f"Code: {doc['commit']}. Serve's HAProxy ingress, one replica of `serve/app.py`'s application "
             f"(batching up to 32, {THREADS} torch threads), a one-epoch model at {SIZE}x{SIZE}; the clients run "
             "on the same cores.", ""]
    if "load" in doc:
        d = doc["load"]
        lines += ["## Every answer logged once (`load`)", "",
                  f"{d['requests']} requests ({LOAD_CLIENTS} clients x {LOAD_REQUESTS}), each a different PNG, "
                  f"{d['answers_per_s']:.0f} answers/s, {d['errors']} errors; Serve shut down in "
                  f"{d['shutdown_s']:.1f} s, then the log read ({d['fragments']} fragments).", "",
                  "| rows | matched | **lost_rows** | duplicates | rows without answer | other fields differing |",
                  "|---|---|---|---|---|---|",
                  f"| {d['rows']} | {d['matched']} | **{d['lost_rows']}** | {d['duplicates']} | "
                  f"{d['rows_without_answer']} | {d['field_mismatches']} |", ""]
    if "kill" in doc:
        d = doc["kill"]
        rec = f"{d['recovery_s']:.1f} s" if d["recovery_s"] is not None else "none"
        lines += ["## SIGKILL of the replica (`kill`)", "",
                  f"Flush every {d['flush_interval_s']} s; the replica's worker (pid {d['killed_pid']}) killed "
                  f"after {d['answers_before_kill']} answers at {d['answers_per_s_before_kill']:.0f} answers/s; "
                  f"first answer after the kill {rec} later (new replica {d['new_replica_pids']}), "
                  f"{d['answers_after_kill']} answers after it, {d['errors_after_kill']} errors meanwhile.", "",
                  "| fragments | corrupt_fragments | **lost_rows_after_kill** | bound (last interval + in flight) "
                  "| within bound | lost, answered before / after the kill | duplicates |",
                  "|---|---|---|---|---|---|---|",
                  f"| {d['fragments']} | {d['corrupt_fragments']} | **{d['lost_rows_after_kill']}** | "
                  f"{d['bound']:.0f} | {'yes' if d['within_bound'] else 'no'} | {d['lost_answered_before_kill']} / "
                  f"{d['lost_answered_after_kill']} | {d['duplicates']} |", "",
                  f"At the kill the last fragment was {age(d.get('last_fragment_age_at_kill_s'))} old and the oldest "
                  f"lost answer {age(d.get('oldest_lost_answer_age_s'))}; "
                  f"{d.get('answers_in_last_interval_before_kill', '-')} answers came back in the last "
                  f"{d['flush_interval_s']} s before it; temporary files left: {len(d.get('temp_files_left', []))}.",
                  ""]
    if "throughput" in doc:
        d = doc["throughput"]
        lines += ["## What logging costs (`throughput`)", "",
                  f"{d['clients']} clients, one PNG a request (raw `image/png`), {d['seconds']} s a run, medians of "
                  f"{d['repeats']} runs in turns.", "", "| logging | req/s | p50 ms | p99 ms |", "|---|---|---|---|",
                  *(f"| {k} | {d[k]['rps']:.1f} | {d[k]['p50_ms']:.1f} | {d[k]['p99_ms']:.1f} |"
                    for k in ("on", "off")),
                  "", f"throughput_ratio (on / off) = **{d['throughput_ratio']:.3f}**, {d['errors']} errors", ""]
    if doc.get("run_lengths"):
        import chart_runs

        lines += ["## Run lengths of the drift chart (`run_lengths`)", "", chart_runs.markdown(doc["run_lengths"])]
    lines += ["Targets: lost_rows = 0, no duplicates; after a SIGKILL no corrupt fragment and lost_rows_after_kill "
              "<= one flush interval's answers (+ those in flight); throughput_ratio >= 0.97."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds a throughput run")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs a setting")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--merge", action="store_true", help="keep the other parts' results already in --out")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")

    sys.path.insert(0, str(ROOT))
    from serve.app import ingress_env

    t_start = time.perf_counter()
    previous = args.out / "line.json"
    doc: dict = json.loads(previous.read_text()) if previous.exists() and args.merge else {}
    doc.update({"machine": machine(), "commit": COMMIT})
    opts = {"seconds": args.seconds, "repeats": args.repeats}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        if any(p in SERVE_PARTS for p in parts):
            say(f"workspace: synthetic, one epoch at {SIZE}x{SIZE}")
            ws, image = make_workspace(Path(tmp), SIZE)
        env = {**os.environ, **ingress_env("haproxy")}  # read once by Serve's processes: a fresh Ray a part
        for name in parts:
            say(f"--- {name}")
            if name == "run_lengths":
                doc["run_lengths"] = run_lengths()
                continue
            proc = subprocess.run([sys.executable, __file__, "--part", name, str(ws), str(image), json.dumps(opts)],
                                  env=env, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                say(f"{name}: failed (exit {proc.returncode})")
                failed.append(name)
                doc[name] = {"error": f"exit {proc.returncode}", "commit": COMMIT}
                continue
            doc[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["targets"] = targets(doc)
    doc.update(headline(doc))
    doc[f"seconds_{'_'.join(parts)}"] = round(time.perf_counter() - t_start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "line.json").write_text(json.dumps(doc, indent=2) + "\n")
    ok = {k: v for k, v in doc.items() if not (isinstance(v, dict) and "error" in v)}
    (args.out / "line.md").write_text(markdown(ok))
    print(markdown(ok))
    say(f"wrote {args.out / 'line.md'} and line.json in {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


def headline(doc: dict) -> dict:
    """The issue's named figures at the top level of line.json (the parts hold the detail)."""
    out = {}
    for key, part in (("lost_rows", "load"), ("lost_rows_after_kill", "kill"), ("flush_interval_s", "kill"),
                      ("throughput_ratio", "throughput")):
        if key in doc.get(part, {}):
            out[key] = doc[part][key]
    return out


def targets(doc: dict) -> dict:
    out = {}
    if "lost_rows" in doc.get("load", {}):
        out["lost_rows"] = {"value": doc["load"]["lost_rows"], "duplicates": doc["load"]["duplicates"],
                            "met": doc["load"]["lost_rows"] == 0 and doc["load"]["duplicates"] == 0}
    if "lost_rows_after_kill" in doc.get("kill", {}):
        k = doc["kill"]
        out["lost_rows_after_kill"] = {"value": k["lost_rows_after_kill"], "bound": k["bound"],
                                       "corrupt_fragments": k["corrupt_fragments"],
                                       "met": k["within_bound"] and k["corrupt_fragments"] == 0}
    if "throughput_ratio" in doc.get("throughput", {}):
        r = doc["throughput"]["throughput_ratio"]
        out["throughput_ratio"] = {"value": r, "target": 0.97, "met": r >= 0.97}
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--part":
        os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
        result = part_process(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), json.loads(sys.argv[5]))
        print(json.dumps(result))
    else:
        sys.exit(main())

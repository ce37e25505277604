"""One function per CLI command: argparse namespace in, exit code out, progress and a summary printed."""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from aae_ray import artifacts, importing
from aae_ray.config import load_config
from aae_ray.formatting import metric, short
from aae_ray.labels import current_labels
from aae_ray.pool_scoring import score_pool
from aae_ray.status import workspace_status
from aae_ray.train import train_round
from aae_ray.workspace import Workspace

if TYPE_CHECKING:
    from aae_ray.tuning.runner import TuneOutcome


def init(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.source == "synthetic":
        out = importing.synthetic(args.workspace, seed=args.seed, n_normal=args.n_normal, n_defect=args.n_defect,
                                  size=args.size)
    elif args.source == "fashion-mnist":
        out = importing.fashion_mnist(args.workspace, normal_class=args.normal_class, pollution=args.pollution,
                                      labeled_ratio=args.labeled_anomaly_ratio, seed=args.seed, idx_dir=args.idx_dir)
    else:
        out = importing.folders(args.workspace, normal=args.normal, defect=args.defect, unlabeled=args.unlabeled,
                                mask=args.mask)
    _print_import(out, time.perf_counter() - start)
    return 0


def ingest(args: argparse.Namespace) -> int:
    """The line's logged images into the pool: the next `aae-ray score` queues them."""
    start = time.perf_counter()
    which = "all" if args.sample is not None else args.which
    out = importing.line(args.workspace, since=args.since, which=which, sample=args.sample, seed=args.seed)
    _print_import(out, time.perf_counter() - start)
    if out.n_added:
        print(f"next: aae-ray score {out.ws.root} (or aae-ray round) queues them for labeling")
    return 0


def _print_import(out: importing.Imported, seconds: float) -> None:
    print(f"{out.ws.root}: {out.n_read} images read, {out.n_added} new, {len(out.skipped)} skipped; "
          + ", ".join(f"{k} {v}" for k, v in sorted(out.splits.items())) + f" ({seconds:.1f} s)")


def train(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    fixed = {"epochs": args.epochs} if args.epochs is not None else {}
    cfg = load_config(args.config, args.overrides, **fixed)
    start = time.perf_counter()
    m = train_round(ws, cfg, round_no=0, progress=not args.no_progress)
    ws.promote(0, "aae-ray train")
    print(f"round 0 trained in {time.perf_counter() - start:.0f} s and promoted: val AUROC {metric(m['val_auroc'])}, "
          f"test AUROC {metric(m['test_auroc'])}, {m['primary_score']} score threshold {m['threshold']:.3g} "
          f"({m['threshold_method']}), "
          f"prior fit (fresh discriminator) {m['prior_fit']['fresh_disc_acc']:.2f}; model in {ws.model_dir(0)}")
    return 0


def recalibrate(args: argparse.Namespace) -> int:
    from aae_ray.train import recalibrate as recalibrate_model

    ws = Workspace.open(args.workspace)
    out = recalibrate_model(ws)
    b, a = out["before"], out["after"]
    if a["threshold"] == b["threshold"] and a["n_calibration"] == b["n_calibration"]:
        print(f"round {out['round']}: threshold unchanged at {a['threshold']:.4g}; {a['threshold_note']}")
    else:
        print(f"round {out['round']}: threshold {b['threshold']:.4g} ({b['threshold_basis']}, {b['n_calibration']} "
              f"known normals) -> {a['threshold']:.4g} ({a['threshold_basis']}, {a['n_calibration']}); weights "
              f"untouched, re-promoted so that `aae-ray serve` picks it up. {a['threshold_note']}")
    return 0


def export(args: argparse.Namespace) -> int:
    """The model as one ONNX graph with its JSON (aae_ray.export), checked against the model first."""
    from aae_ray.export import export_workspace

    out = export_workspace(Workspace.open(args.workspace), round_no=args.round, out=args.out)
    worst = max(v for k, v in out.max_rel_diff.items() if k != "codes")  # the scores; codes are not gated
    print(f"exported {out.folder / 'model.onnx'} and model.json; ONNX Runtime matches the model on "
          f"{out.n_checked} workspace images (largest relative difference {worst:.1e}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in out.max_rel_diff.items()) + ")")
    print(f"score images on a line box: aae-ray-edge {out.folder} IMAGE...")
    return 0


def tune(args: argparse.Namespace) -> int:
    from aae_ray.tuning.runner import experiment_dir, next_round, resumed_round, run_tune

    ws = Workspace.open(args.workspace)
    if args.resume:
        spec = None  # the round's saved spec: its trials were sampled from it
        if args.config or args.num_samples or args.max_concurrent:
            print("note: --resume continues with the spec the round started with; --config, --num-samples and "
                  "--max-concurrent are ignored")
    else:
        spec = _load_spec(args)
    round_no = args.round
    if round_no is None:
        round_no = resumed_round(ws) if args.resume else next_round(ws)
    start = time.perf_counter()
    try:
        out = run_tune(ws, spec, round_no=round_no, address=args.address, resume=args.resume,
                       max_ms_per_image=args.max_ms_per_image)
    except KeyboardInterrupt:
        print(f"interrupted; the experiment in {experiment_dir(ws, round_no)} is resumable: "
              f"aae-ray tune {ws.root} --resume", file=sys.stderr)
        return 130
    return _print_tune(ws, out, time.perf_counter() - start)


def _print_tune(ws: Workspace, out: TuneOutcome, seconds: float) -> int:
    """The trials ranked, and the round's summary line; the exit code (130: interrupted, resumable)."""
    from aae_ray.tuning.runner import ranked
    from aae_ray.tuning.selection import front

    spec, round_no = out.spec, out.round_no
    timed = spec.latency is not None
    on_front = {r.trial_id for r in front(out.rows, spec)}
    header = f"{'trial':>10}  {'status':<10} {spec.metric:>9}" + ("  ms/image front" if timed else "")
    print(header + "  epochs  params")
    for r in ranked(out.rows, spec)[:10 if not timed else len(out.rows)]:
        params = " ".join(f"{k}={short(v)}" for k, v in r.params.items())
        latency = (f"  {metric(r.ms_per_image, 3):>8} {'*' if r.trial_id in on_front else '':>5}" if timed else "")
        print(f"{r.trial_id:>10}  {r.status:<10} {metric(r.metric):>9}{latency}  {r.epochs:>6}  {params}"
              + (f"  ({r.error})" if r.error else ""))
    counts = Counter(r.status for r in out.rows)
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if out.interrupted:
        print(f"tune interrupted after {len(out.rows)} of {spec.num_samples} trials ({tally}); "
              f"resume with: aae-ray tune {ws.root} --resume")
        return 130
    if out.best is None:
        raise RuntimeError(f"{out.no_choice} ({tally}); see the trials above and {out.experiment}")
    m = out.metrics
    cur = ws.current()
    promoted = "promoted" if cur and cur["round"] == round_no else f"not promoted (round {cur['round']} is current)"
    print(f"best config: {m['config']}")
    source = "val" if out.objective_source == "val" else "synthetic corruptions (no labeled defects in val)"
    print(f"tuned round {round_no} in {seconds:.0f} s: {len(out.rows)} trials ({tally}); best "
          f"{out.best.trial_id} {spec.metric} {metric(out.best.metric)} on {source}, val AUROC "
          f"{metric(m['val_auroc'])}, test AUROC {metric(m['test_auroc'])}; model {ws.model_dir(round_no)} "
          f"{promoted}; report {out.report}")
    if timed:
        budget = spec.select.max_ms_per_image
        print(f"latency: {out.best.trial_id} scores in {metric(out.best.ms_per_image, 3)} ms/image "
              f"({out.best.latency_engine}, batch {spec.latency.batch_size}); "
              + (f"the best {spec.metric} within {budget:g} ms" if budget else "no select.max_ms_per_image budget")
              + f"; front: {len(on_front)} trials ({out.report}/pareto.png)")
    return 0


def _load_spec(args: argparse.Namespace):
    """The tuning spec a command names (default: tune_configs/default.yaml), with its command-line overrides."""
    from aae_ray.tuning.spec import default_spec_path, load_spec

    return load_spec(args.config or default_spec_path(), num_samples=args.num_samples,
                     max_concurrent=getattr(args, "max_concurrent", None),
                     max_ms_per_image=getattr(args, "max_ms_per_image", None))


def score(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    path, table = score_pool(ws, policy=args.policy, engine=args.engine, num_gpus=args.gpus,
                             address=args.address)
    rows = table.to_pylist()
    for r in rows[: args.top]:
        print(f"  #{r['rank']:<4} {r['id']}  score {r['score']:9.3g}  T2 {r['t2']:9.2f}  local T2 {r['t2_local']:9.2f}"
              f"  p {r['p_value']:.2e}"
              + ("  ANOMALY" if r["anomaly"] else ""))
    flagged = sum(r["anomaly"] for r in rows)
    print(f"scored {len(rows)} pool images, {flagged} above the threshold; queue in {path}")
    return 0


def label(args: argparse.Namespace) -> int:
    """Run labeling_ui/app.py with `streamlit run` until Ctrl-C; the page reads and writes the workspace."""
    ws = Workspace.open(args.workspace)
    print(f"labeling page for {ws.root}: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    return _streamlit("app.py", ws, args.host, args.port)


def monitor(args: argparse.Namespace) -> int:
    """The line monitor: its Streamlit page until Ctrl-C, or with --report its charts as PNG and JSON."""
    from aae_ray.monitor import MonitorSettings

    ws = Workspace.open(args.workspace)
    settings = MonitorSettings(lam=args.lam, arl0=args.arl0)
    if args.report:
        from aae_ray.monitor_report import write_report

        data = write_report(ws, args.report, settings, stations=args.station, since=args.since, until=args.until)
        print(f"{data['images']} served images, {len(data['alarms'])} alarm(s) in the window "
              f"({data['new_alarms']} new); charts and numbers in {args.report}")
        for a in data["alarms"][:5]:
            print(f"  {a['text']}")
        return 0
    print(f"line monitor for {ws.root}: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    return _streamlit("monitor.py", ws, args.host, args.port, "--lam", str(args.lam), "--arl0", str(args.arl0))


def _streamlit(script: str, ws: Workspace, host: str, port: int, *extra: str) -> int:
    app = importlib.resources.files("labeling_ui") / script  # a script for `streamlit run`, not a module to import
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
           "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal",  # a labeler has no use for Deploy, Rerun or Clear cache
           "--server.fileWatcherType", "none", "--", "--workspace", str(ws.root.resolve()), *extra]
    return _run_until_stopped(subprocess.Popen(cmd))


LABEL_STOP_GRACE_S = 8.0  # Streamlit stops in about a second; then it is killed, so Ctrl-C never hangs


def _run_until_stopped(proc: subprocess.Popen) -> int:
    """Wait for the page's server. Ctrl-C or SIGTERM to this process is passed on to it: a terminal's Ctrl-C
    reaches both, but a `kill` of this process alone would leave Streamlit running with the port taken."""
    stopped_at: list[float] = []

    def forward(sig, _frame) -> None:
        stopped_at.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            if stopped_at and time.monotonic() - stopped_at[0] > LABEL_STOP_GRACE_S:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_at:
        print("labeling page stopped", flush=True)
        return 0
    return proc.returncode


def serve(args: argparse.Namespace) -> int:
    """The promoted model behind Ray Serve until Ctrl-C or SIGTERM; replicas follow promotions."""
    from aae_ray import serving

    ws = Workspace.open(args.workspace)
    # A missing or broken model fails here, in one line, before Ray starts; with --engine onnx the export is
    # made here too, once, not by every replica.
    model = serving.load_current(ws, engine=args.engine)
    cfg = serving.settings(workspace=ws.root, token=args.token, max_batch_size=args.max_batch,
                           replicas=args.replicas, log=not args.no_log, log_images=args.log_images,
                           log_sample=args.log_sample, engine=args.engine)
    print(f"scoring on {model.device}", flush=True)
    serving.check_port(args.host, args.port)
    print(f"starting Ray Serve for round {model.round} ({model.path}, input {model.size}x{model.size}) ...",
          flush=True)
    from serve import app

    app.serve_forever(cfg, host=args.host, port=args.port, address=args.address, ingress=args.ingress,
                              echo=lambda line: print(line, flush=True))
    return 0


def round_(args: argparse.Namespace) -> int:  # `round` would shadow the builtin
    from aae_ray.rounds import run_round

    ws = Workspace.open(args.workspace)
    spec = _load_spec(args)
    start = time.perf_counter()
    if args.ingest:
        _ingest_before_round(ws, args.ingest)
    out = run_round(ws, spec, address=args.address, policy=args.policy)
    labels = Counter(current_labels(ws.labels_dir).values())
    print(f"round {out.round_no} in {time.perf_counter() - start:.0f} s: "
          f"{'promoted' if out.promoted else 'kept the current model'} ({out.reason}); test AUROC "
          f"{metric(out.metrics.get('test_auroc'))}; labels so far {dict(labels) or 'none'}; queue in {out.queue}")
    return 0


def _ingest_before_round(ws: Workspace, which: str) -> None:
    """`aae-ray round --ingest`: the line's logged images join the pool before the round trains and queues."""
    from aae_ray.prediction_log import read_predictions

    if not ws.predictions_dir.is_dir() or read_predictions(ws.predictions_dir, columns=["id"]).num_rows == 0:
        print(f"--ingest: nothing logged in {ws.predictions_dir} yet (aae-ray serve logs there); the round goes on")
        return
    start = time.perf_counter()
    _print_import(importing.line(ws.root, which=which), time.perf_counter() - start)


def simulate(args: argparse.Namespace) -> int:
    """Answer the queue from the import's truth, --rounds times; report defects found and AUROC by round in
    WS/report/active_learning.{png,json}."""
    from aae_ray.learning_curves import simulate as simulate_rounds

    ws = Workspace.open(args.workspace)
    doc = simulate_rounds(ws, _load_spec(args), rounds=args.rounds, labels_per_round=args.labels_per_round,
                          address=args.address, policy=args.policy)
    found = doc["defects_found"]
    random_curve = next(c for k, c in doc["policy_curves"].items() if k.startswith("random"))
    by_chance = random_curve[len(found) - 1] if found else 0.0
    print(f"simulated {args.rounds} round(s): {sum(found)} defects in {len(found)} labels (random labeling: "
          f"{by_chance:.1f}); current model's test AUROC by round: "
          f"{' -> '.join(metric(a) for a in doc['test_auroc_by_round'])}; plot in {doc['plot']}")
    return 0


def status(args: argparse.Namespace) -> int:
    st = workspace_status(Workspace.open(args.workspace))
    print(f"workspace {st.root}")
    for imp in st.imports:
        print(f"  import {imp['at']}: {imp['source']}, {imp['images']} images ({imp['added']} new, "
              f"{imp['skipped']} skipped)")
    print("  images: " + ", ".join(f"{k} {v}" for k, v in st.splits.items()))
    print("  labels: " + (", ".join(f"{k} {v}" for k, v in st.labels.items()) or "none yet"))
    for r in st.rounds:
        on_queue = (" labels on its queue: " + ", ".join(f"{k} {v}" for k, v in r.answered.items())
                    if r.answered else "")
        if r.metrics is None:
            print(f"  round {r.round}: no model{';' if on_queue else ''}{on_queue}")
            continue
        mark = " (current)" if st.current and st.current["round"] == r.round else ""
        print(f"  round {r.round}{mark}: val AUROC {metric(r.metrics.get('val_auroc'))}, test AUROC "
              f"{metric(r.metrics.get('test_auroc'))}" + (f";{on_queue}" if on_queue else ""))
        if r.tune:
            _print_tune_summary(r.tune)
        if r.report:
            print(f"    report: {r.report}")
    cur = st.current
    print(f"current model: {cur['model']} (round {cur['round']})" if cur else "current model: none")
    if cur:
        print(f"threshold: {metric(st.threshold)}; {st.threshold_note}")
        if st.hidden_defects:
            print(f"hidden defects: {st.hidden_defects}; t2_trim {st.t2_trim:.1%}")
    if st.line:
        ln = st.line
        print(f"line: {ln['rows']} served images ({ln['flagged']} flagged) from {ln['first']:%Y-%m-%d %H:%M} to "
              f"{ln['last']:%Y-%m-%d %H:%M} UTC, stations {', '.join(ln['stations'])}")
    if st.alarms and st.alarms["count"]:
        print(f"alarms: {st.alarms['count']} (aae-ray monitor {st.root} shows them)")
        for text in st.alarms["latest"]:
            print(f"  {text}")
    return 0


DEMO_LABELS = 20


def demo(args: argparse.Namespace) -> int:
    """Synthetic solder joints -> tune (tune_configs/default.yaml) -> score -> summary. Safe to re-run: the
    import is idempotent and each run tunes a new round."""
    from aae_ray.learning_curves import pool_truth
    from aae_ray.tuning.runner import next_round, run_tune

    ws_dir: Path = args.workspace
    print(f"== 1/4 init {ws_dir}")
    start = time.perf_counter()
    imported = importing.synthetic(ws_dir, seed=args.seed)
    _print_import(imported, time.perf_counter() - start)
    ws = imported.ws
    round_no = next_round(ws)
    print(f"== 2/4 tune round {round_no} (tune_configs/default.yaml: Ray Tune + Optuna TPE + ASHA on this machine)")
    spec = _load_spec(args)
    start = time.perf_counter()
    code = _print_tune(ws, run_tune(ws, spec, round_no=round_no), time.perf_counter() - start)
    if code != 0:
        return code
    m = artifacts.read_metrics(ws.model_dir(round_no))
    print("== 3/4 score the pool with the promoted model")
    path, table = score_pool(ws)
    ids = table.column("id").to_pylist()
    truth = dict(zip(ids, pool_truth(ws, ids).tolist(), strict=True))
    top = table.slice(0, 10).to_pylist()
    print("top suspects (rank, id, score, truth known to the synthetic import):")
    for r in top:
        kind = "defect" if truth[r["id"]] else "normal"
        print(f"  #{r['rank']:<3} {r['id']}  score {r['score']:8.3g}  {kind}")
    hits = sum(truth[r["id"]] == 1 for r in top)
    print(f"== 4/4 a simulated labeler answers the first {DEMO_LABELS} of the queue, then a round fine-tunes on them")
    from aae_ray.rounds import answer_queue, run_round

    batch = answer_queue(ws, DEMO_LABELS)
    print(f"the labeler confirmed {batch.n_defects} defects and {len(batch.ids) - batch.n_defects} normals")
    # Round 0 showed the search; round 1 is the quick kind (`round: {search: false}`): round 0's model
    # fine-tuned on the labels, promoted only on a clear paired gain. A second search would cost the demo
    # ~110 s of its 3 minutes (`aae-ray round` searches unless the spec says otherwise).
    spec = spec.model_copy(update={"round": spec.round.model_copy(update={"search": False})})
    out = run_round(ws, spec)
    after = artifacts.read_metrics(ws.current_model_dir())
    print(f"round {out.round_no}: {'promoted' if out.promoted else 'kept the current model'} ({out.reason})")
    _demo_serve(ws, out.queue)
    test = after.get("test") or {}
    print(f"round {round_no}'s best trial had test AUROC {metric(m['test_auroc'])} and {hits}/10 real defects among "
          f"its top pool suspects; labeling found {batch.n_defects} defects in {len(batch.ids)} labels")
    print(f"demo done: the promoted model (round {out.round_no if out.promoted else round_no}) has test image "
          f"AUROC {metric(after.get('test_auroc'))}; at its threshold ({after.get('threshold_method')}, alpha "
          f"{after.get('config', {}).get('alpha', 0.01)}) it catches {metric(test.get('tpr'))} of the test defects "
          f"with {metric(test.get('fpr'))} false alarms. Next: `aae-ray label {ws.root}` to confirm the queue "
          f"({out.queue}) in a browser, `aae-ray serve {ws.root}` for the line")
    return 0


def _demo_serve(ws: Workspace, queue: Path) -> None:
    """`aae-ray serve` for a moment: two top suspects and two of the most normal pool images scored over HTTP."""
    import pyarrow.parquet as pq

    from aae_ray import serving
    from aae_ray.client import Client
    from serve import app

    rows = pq.read_table(queue, columns=["id", "score"]).to_pylist()
    picks = rows[:2] + rows[-2:] if len(rows) > 4 else rows
    table = ws.images()
    image = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    port = serving.free_port()
    print(f"== serve the promoted model on http://127.0.0.1:{port} (what `aae-ray serve {ws.root}` runs) and score "
          f"{len(picks)} pool images over HTTP")
    cfg = serving.settings(workspace=ws.root, num_cpus=0)  # reserves no CPU: it starts whatever Ray is running
    with app.running(cfg, port=port) as url:
        answer = Client(url).score_response([image[r["id"]] for r in picks])
    for r, res in zip(picks, answer["results"], strict=True):
        print(f"  {r['id']}  score {res['score']:8.3g} over HTTP ({r['score']:8.3g} offline)  "
              + ("ANOMALY" if res["anomaly"] else "normal"))
    print(f"answered by round {answer['model']['round']} ({answer['model']['path']}); the endpoint is stopped")


def _print_tune_summary(t: dict) -> None:
    total = sum(t["trials"].values())
    tally = ", ".join(f"{v} {k}" for k, v in sorted(t["trials"].items()))
    best = t.get("best") or {}
    source = "val" if t["objective_source"] == "val" else "synthetic corruptions"
    print(f"    tune: {total} trials ({tally}), best {best.get('trial', 'none')} {t['metric']} "
          f"{metric(best.get(t['metric']))} on {source}" + (" [interrupted: --resume]" if t["interrupted"] else ""))
    if t.get("pareto"):  # a latency search
        budget = t.get("max_ms_per_image")
        print(f"    latency: best scores in {metric(best.get('ms_per_image'), 3)} ms/image"
              + (f" (budget {budget:g} ms)" if budget else " (no budget)")
              + f"; front of {len(t['pareto'])} trials: " + ", ".join(
                  f"{metric(p[t['metric']], 3)} at {metric(p['ms_per_image'], 3)} ms" for p in t["pareto"]))

"""`aae-ray`: the command line. It parses, calls library functions and prints; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from aae_ray import __version__

POLICIES = ("highest", "diverse", "uncertain")  # aae_ray.queue.POLICIES, spelled here so --help stays fast
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2 (argparse would add the usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aae-ray", description="Visual inspection with few defects: AAE + Hotelling's T2.")
    p.add_argument("--version", action="version", version=f"aae-ray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_import_command, _model_commands, _people_commands, _round_commands):
        add(sub)
    return p


def _import_command(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init", help="create a workspace (or add images to one)")
    init.add_argument("workspace", type=Path)
    init.add_argument("--source", required=True, choices=["synthetic", "fashion-mnist", "folder"])
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--n-normal", type=int, default=600, help="synthetic: number of normal images")
    init.add_argument("--n-defect", type=int, default=60, help="synthetic: number of defect images")
    init.add_argument("--size", type=int, default=128, choices=[32, 64, 128], help="synthetic: image side")
    init.add_argument("--normal-class", type=int, help="fashion-mnist: the class (0-9) that is normal")
    init.add_argument("--idx-dir", type=Path, help="fashion-mnist: folder with the IDX files")
    init.add_argument("--pollution", type=float, default=0.0, help="fashion-mnist: unlabeled anomaly share")
    init.add_argument("--labeled-anomaly-ratio", type=float, default=0.0, help="fashion-mnist: labeled share")
    init.add_argument("--normal", type=Path, help="folder: images of good parts")
    init.add_argument("--defect", type=Path, help="folder: images of confirmed defects")
    init.add_argument("--unlabeled", type=Path, help="folder: images nobody has judged yet")
    init.add_argument("--mask", type=Path, help="folder: ground-truth masks of the --defect images, for evaluation "
                      "(same relative paths, or MVTec's <name>_mask.png; nonzero = defect)")
    ingest = sub.add_parser("ingest", help="the line's logged images (WS/predictions/) into the pool")
    ingest.add_argument("workspace", type=Path)
    ingest.add_argument("--since", type=_utc_time, help="only images served at or after this time (ISO 8601; "
                        "UTC unless it names its zone)")
    which = ingest.add_mutually_exclusive_group()
    which.add_argument("--flagged", dest="which", action="store_const", const="flagged",
                       help="the images the model flagged (the default)")
    which.add_argument("--all", dest="which", action="store_const", const="all",
                       help="every logged image whose bytes were kept (serve --log-images/--log-sample)")
    which.add_argument("--sample", type=float, metavar="F", help="a seeded share F of every kept image")
    ingest.add_argument("--seed", type=int, default=0, help="the --sample draw")
    ingest.set_defaults(which="flagged")


def _model_commands(sub: argparse._SubParsersAction) -> None:
    """Train, tune and score."""
    train = sub.add_parser("train", help="train one model (no Ray) as round 0 and promote it")
    train.add_argument("workspace", type=Path)
    train.add_argument("--config", type=Path, help="YAML file of AAEConfig fields")
    train.add_argument("--epochs", type=int)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")

    tune = sub.add_parser("tune", help="search architectures with Ray Tune + Optuna; export and report the best")
    tune.add_argument("workspace", type=Path)
    _search_arguments(tune)
    tune.add_argument("--max-concurrent", type=int, help="trials at once (overrides the spec)")
    tune.add_argument("--round", type=int, help="round number (default: the next one; with --resume the last)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted or killed run")

    score = sub.add_parser("score", help="score the pool with the promoted model; write the queue")
    score.add_argument("workspace", type=Path)
    _policy_argument(score)
    score.add_argument("--engine", choices=["auto", "local", "ray", "onnx"], default="auto",
                       help="ray: Ray Data actors (large pools); local: this process; onnx: this process on ONNX "
                            "Runtime (the round's export, made on first use); auto: by the pool's size")
    score.add_argument("--gpus", type=float, default=0.0, help="GPUs per Ray Data actor (with --engine ray)")
    score.add_argument("--address", help="score on this Ray cluster with Ray Data, which --engine auto then picks "
                                         "(every node must see the workspace)")
    score.add_argument("--top", type=int, default=10, help="how many suspects to print")


def _people_commands(sub: argparse._SubParsersAction) -> None:
    """What people and the line talk to: the labeling page and the endpoint."""
    label = sub.add_parser("label", help="open the Streamlit labeling page on 127.0.0.1")
    label.add_argument("workspace", type=Path)
    label.add_argument("--port", type=int, default=8501)
    label.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")

    mon = sub.add_parser("monitor", help="the line's control charts and drift alarms (a page on 127.0.0.1)")
    mon.add_argument("workspace", type=Path)
    mon.add_argument("--port", type=int, default=8502)
    mon.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    mon.add_argument("--report", type=Path, metavar="DIR", help="write the charts (PNG) and numbers (JSON) here "
                                                                 "instead of opening the page")
    mon.add_argument("--station", action="append", help="--report: only this station (repeatable)")
    mon.add_argument("--since", type=_utc_time, help="--report: from this time (ISO 8601, UTC if no zone)")
    mon.add_argument("--until", type=_utc_time, help="--report: up to this time")
    mon.add_argument("--lam", type=float, default=0.1, help="EWMA weight of the newest image (default 0.1)")
    mon.add_argument("--arl0", type=float, default=500.0,
                     help="images between false drift alarms the limits are designed for (default 500)")

    srv = sub.add_parser("serve", help="the promoted model behind an HTTP endpoint (Ray Serve) until Ctrl-C")
    srv.add_argument("workspace", type=Path)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=_replicas, default=1, help="N, or auto (autoscale 1..CPUs or GPUs)")
    srv.add_argument("--token", default=os.environ.get("AAE_RAY_SERVE_TOKEN"),
                     help="require 'Authorization: Bearer T' (default: $AAE_RAY_SERVE_TOKEN; none: open)")
    srv.add_argument("--max-batch", type=int, default=32, help="images scored in one forward pass")
    srv.add_argument("--address", help="deploy on this Ray cluster (default: RAY_ADDRESS, else start Ray here)")
    srv.add_argument("--ingress", choices=["haproxy", "python"], default="haproxy",
                     help="Serve's HTTP front end for a Ray started here: haproxy (fast) or Ray's Python proxy")
    srv.add_argument("--log-images", choices=["flagged", "all", "none"], default="flagged",
                     help="whose image bytes WS/predictions/ keeps beside every answer (default: the flagged)")
    srv.add_argument("--log-sample", type=float, default=0.0, metavar="F",
                     help="also keep the bytes of this share of the other images (default 0)")
    srv.add_argument("--no-log", action="store_true", help="log nothing to WS/predictions/")
    srv.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                     help="onnx: the round's export in ONNX Runtime (CPU; made on first use); auto (default): "
                          "ONNX Runtime on CPU replicas where the model exports, else torch")


def _round_commands(sub: argparse._SubParsersAction) -> None:
    """Rounds, and the commands that read or re-set the promoted model."""
    exp = sub.add_parser("export", help="the model as one ONNX graph (T2 inside) and a JSON, for aae-ray-edge")
    exp.add_argument("workspace", type=Path)
    exp.add_argument("--round", type=int, help="which round's model (default: the promoted one)")
    exp.add_argument("--format", choices=["onnx"], default="onnx")
    exp.add_argument("--out", type=Path, help="folder to write (default: WS/exports/rNNN-onnx)")

    rnd = sub.add_parser("round", help="labels -> tune -> compare -> promote if better -> new queue")
    rnd.add_argument("workspace", type=Path)
    _search_arguments(rnd)
    _policy_argument(rnd)
    rnd.add_argument("--ingest", nargs="?", const="flagged", choices=["flagged", "all"], metavar="flagged|all",
                     help="first bring the line's logged images (WS/predictions/) into the pool, as `aae-ray "
                          "ingest` does: the flagged ones (bare --ingest) or all whose bytes were kept")

    sim = sub.add_parser("simulate", help="answer the queue from the import's truth and run rounds, to measure")
    sim.add_argument("workspace", type=Path)
    sim.add_argument("--rounds", type=int, required=True)
    sim.add_argument("--labels-per-round", type=int, required=True)
    _search_arguments(sim)
    _policy_argument(sim)

    recal = sub.add_parser("recalibrate", help="re-set the promoted model's threshold on the normals known now "
                                                "(labels, val) that it never trained on; weights untouched")
    recal.add_argument("workspace", type=Path)

    status = sub.add_parser("status", help="rounds, metrics, labels, current model")
    status.add_argument("workspace", type=Path)

    demo = sub.add_parser("demo", help="the loop on synthetic solder joints: init, tune, score, summary")
    demo.add_argument("workspace", type=Path, nargs="?", default=Path("aae-demo"))
    _search_arguments(demo, address=False)
    demo.add_argument("--seed", type=int, default=0)


def _search_arguments(p: argparse.ArgumentParser, address: bool = True) -> None:
    """The options of every command that runs a tuning search."""
    p.add_argument("--config", type=Path, help="tuning spec (default: tune_configs/default.yaml)")
    if address:
        p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start Ray here)")
    p.add_argument("--num-samples", type=int, help="number of trials (overrides the spec)")
    p.add_argument("--max-ms-per-image", type=float, metavar="MS", help="a latency search's budget: the round's "
                   "model is the best trial scoring within MS milliseconds an image (overrides select in the spec)")


def _replicas(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a number of replicas >= 1 or auto, got {value!r}")


def _utc_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r} (e.g. 2026-12-02T14:00)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _policy_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=POLICIES, default="highest", help="queue order (default: highest T2)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aae_ray import commands  # imported late: torch takes seconds and --help should not wait

    try:
        return getattr(commands, {"round": "round_"}.get(args.command, args.command))(args)
    except KeyboardInterrupt:
        print("aae-ray: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("AAE_RAY_DEBUG"):
            raise
        print(f"aae-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

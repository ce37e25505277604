"""Edge benchmark (issue 18): does the exported ONNX graph score like the Detector, is ONNX Runtime faster than
torch, and what do the edge scorer's install and cold start cost?

- `max_rel_diff`: every exportable family trained briefly (2 epochs: the comparison is of arithmetic, not of
  accuracy) on the synthetic joints at 32x32, and the default AAE on Fashion-MNIST class 0, exported with
  `aae-ray export`; the largest relative difference of each output, ONNX Runtime against the Detector, on up to
  512 of the workspace's test and pool images (what the exporter itself checks).
- `speedup`: the default AAE (one epoch) at 32x32 and 64x64; images/s of `Detector.score(maps=False)` (torch, 2
  threads) against the ONNX graph in ONNX Runtime (2 intra-op threads, every output of the graph computed, the
  heat map included) at batch 1 and batch 64, the two taking turns, medians of --repeats.
- `edge_install_s`: a fresh venv with `pip install onnxruntime pillow numpy` and this package without its
  dependencies (`pip install --no-deps .`), the edge scorer's whole install; `edge_cold_start_s`: `aae-ray-edge
  MODEL_DIR IMAGE` in a new process, median of 3.

    python bench/edge.py [--repeats 3] [--parts diff,speed,install] [--out bench/results]

Target: ONNX Runtime >= 1.5x torch at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fmnist import COMMIT, machine  # noqa: E402  (bench scripts share helpers, not a package)

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
FAMILIES = ("aae", "patch", "ae", "vae", "deepsad", "egbad")


def cli(*args) -> None:
    from aae_ray.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"aae-ray {' '.join(map(str, args))} exited {code}")


def workspace(tmp: Path, name: str, *init) -> Path:
    ws = tmp / name
    cli("init", ws, *init)
    return ws


def part_diff(tmp: Path) -> dict:
    from aae_ray.export import export_workspace
    from aae_ray.workspace import Workspace

    out = {}
    for family in FAMILIES:
        joints = workspace(tmp, f"joints-{family}", "--source", "synthetic", "--n-normal", "800", "--n-defect", "80",
                           "--size", "32")
        cli("train", joints, "--epochs", "2", "--no-progress", "--set", f"family={family}",
            *(["--set", "pretrain_epochs=1"] if family == "deepsad" else []))
        ws = Workspace.open(joints)
        e = export_workspace(ws, out=tmp / f"onnx-{family}")
        out[f"joints/{family}"] = e.max_rel_diff | {"images": e.n_checked}
        print(f"diff joints/{family}: {e.max_rel_diff}", flush=True)
    fm = workspace(tmp, "fmnist", "--source", "fashion-mnist", "--normal-class", "0")
    cli("train", fm, "--epochs", "1", "--no-progress")
    e = export_workspace(Workspace.open(fm), out=tmp / "onnx-fmnist")
    out["fashion-mnist0/aae"] = e.max_rel_diff | {"images": e.n_checked}
    print(f"diff fashion-mnist0/aae: {e.max_rel_diff}", flush=True)
    return out


def part_speed(tmp: Path, repeats: int) -> dict:
    import onnxruntime as ort
    import torch

    from aae_ray import artifacts
    from aae_ray.export import export_workspace
    from aae_ray.workspace import Workspace

    torch.set_num_threads(THREADS)
    rows = {}
    for size in (32, 64):
        ws_dir = workspace(tmp, f"speed{size}", "--source", "synthetic", "--n-normal", "400", "--n-defect", "20",
                           "--size", str(size))
        cli("train", ws_dir, "--epochs", "1", "--no-progress", "--set", f"input_size={size}")
        ws = Workspace.open(ws_dir)
        folder = export_workspace(ws, out=tmp / f"speed{size}-onnx").folder
        det = artifacts.load(ws.current_model_dir())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
        session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        X = np.random.default_rng(0).random((64 * 8, 1, size, size), dtype=np.float32)
        for batch, n in ((1, 200), (64, 64 * 8)):
            chunks = [X[i : i + batch] for i in range(0, n, batch)]
            engines = {"torch": lambda c, det=det: det.score(c, maps=False),
                       "onnxruntime": lambda c, s=session: s.run(None, {"images": c})}
            for f in engines.values():  # warm-up: first calls allocate
                f(chunks[0])
            rates = {k: [] for k in engines}
            for _ in range(repeats):
                for k, f in engines.items():
                    t0 = time.perf_counter()
                    for c in chunks:
                        f(c)
                    rates[k].append(n / (time.perf_counter() - t0))
            med = {k: statistics.median(v) for k, v in rates.items()}
            rows[f"{size}x{size} batch {batch}"] = {"torch_img_s": med["torch"], "speedup": med["onnxruntime"] / med[
                "torch"], "onnxruntime_img_s": med["onnxruntime"], "runs": rates}
            print(f"speed {size}x{size} batch {batch}: torch {med['torch']:.0f} img/s, onnxruntime "
                  f"{med['onnxruntime']:.0f} img/s", flush=True)
        rows[f"model_dir_{size}"] = str(folder)
    return rows


def part_install(tmp: Path, model_dir: Path) -> dict:
    venv = tmp / "edge-venv"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), "onnxruntime", "pillow", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    install_s = time.perf_counter() - t0
    from aae_ray.workspace import Workspace

    png = tmp / "one.png"
    png.write_bytes(Workspace.open(tmp / "speed32").images().column("image")[0].as_py())
    starts = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(venv / "bin" / "aae-ray-edge"), str(model_dir), str(png)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": ""})
        starts.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file())
    return {"edge_install_s": install_s, "edge_cold_start_s": statistics.median(starts), "cold_starts": starts,
            "venv_mb": size / 2**20}


def markdown(doc: dict) -> str:
    lines = ["# To the edge (`python bench/edge.py`)", "", f"Machine: {doc['machine']}  ",
             f"Code: {doc['commit']}, {doc['seconds']} s.", ""]
    if "max_rel_diff" in doc:
        outs = ("score", "t2", "t2_local", "recon_error", "map")
        lines += ["## Same answers: ONNX Runtime against the Detector (largest relative difference)", "",
                  "| workspace/family | images | " + " | ".join(outs) + " |", "|---" * (len(outs) + 2) + "|"]
        lines += [f"| {k} | {v['images']} | " + " | ".join(f"{v[o]:.1e}" for o in outs) + " |"
                  for k, v in doc["max_rel_diff"].items()]
        lines += ["", "(map: relative to each pixel, floored at 1e-3 of the map's largest value)", ""]
    if "speedup" in doc:
        lines += ["## Speed: images/s, 2 threads each, medians", "", "| input | torch | ONNX Runtime | speedup |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['torch_img_s']:,.0f} | {v['onnxruntime_img_s']:,.0f} | **{v['speedup']:.2f}x** |"
                  for k, v in doc["speedup"].items() if isinstance(v, dict)]
        lines += ["", "Target: >= 1.5x at batch 1.", ""]
    if "edge_install_s" in doc:
        lines += ["## The edge scorer alone", "", f"Install into a fresh venv (onnxruntime, Pillow, numpy, the package "
                  f"without dependencies): **{doc['edge_install_s']:.1f} s**, {doc['venv_mb']:.0f} MB; cold start of "
                  f"`aae-ray-edge MODEL IMAGE` (a new process, one image): **{doc['edge_cold_start_s']:.2f} s** "
                  "(median of 3).", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="diff,speed,install")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    parts = args.parts.split(",")
    doc: dict = {"machine": machine(), "commit": COMMIT}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "diff" in parts:
            doc["max_rel_diff"] = part_diff(tmp)
        if "speed" in parts or "install" in parts:
            speed = part_speed(tmp, args.repeats)
            if "speed" in parts:
                doc["speedup"] = {k: v for k, v in speed.items() if not k.startswith("model_dir")}
            if "install" in parts:
                doc.update(part_install(tmp, Path(speed["model_dir_32"])))
    doc["seconds"] = round(time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (args.out / "edge.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

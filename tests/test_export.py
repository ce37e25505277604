"""ONNX export and the edge scorer: every exportable family's graph scores like its Detector, with T2 inside the
graph; the exporter refuses what it cannot express or what does not match; the edge scorer needs no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config

from aae_ray import artifacts
from aae_ray.detector import Detector
from aae_ray.export import ExportError, ScoringGraph, export_onnx
from aae_ray.models import FAMILIES
from aae_ray.workspace import Workspace

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
EXPORTABLE = [f for f in FAMILIES if f != "anogan"]


@pytest.fixture(scope="module", params=EXPORTABLE)
def family_dir(request, solder, tmp_path_factory):
    """Each exportable family fitted briefly on the solder normals and saved as an artifact."""
    torch.manual_seed(0)
    det = Detector(tiny_config(family=request.param, epochs=2, pretrain_epochs=1, seed=0)).fit(
        solder.normals, X_calibration=solder.normals[:40])
    folder = tmp_path_factory.mktemp(request.param) / "model"
    artifacts.save(det, folder, {"round": 3, "data_fingerprint": "abc"})
    return folder


@pytest.mark.slow  # trains or starts processes: make test runs it, make test-fast does not
def test_every_exportable_family_scores_the_same_in_onnx_runtime(family_dir, solder, tmp_path):
    X, _ = solder.test
    out = export_onnx(family_dir, tmp_path / "onnx", X)
    assert max(v for k, v in out.max_rel_diff.items() if k != "codes") < 1e-4, out.max_rel_diff
    meta = json.loads((out.folder / "model.json").read_text())
    det = artifacts.load(family_dir)
    assert meta["round"] == 3 and meta["data_fingerprint"] == "abc" and meta["primary"] == det.primary_
    assert meta["threshold"] == det.threshold_ and meta["preprocessing"]["input_size"] == det.config.input_size

    from aae_ray.edge import EdgeScorer

    edge = EdgeScorer(out.folder).score(X)
    want = det.score(X, maps=False)
    np.testing.assert_allclose([r["score"] for r in edge], want.score, rtol=1e-4)
    np.testing.assert_allclose([r["p_value"] for r in edge], want.p_value, rtol=1e-6)
    assert [r["anomaly"] for r in edge] == want.anomaly.tolist()


def test_hotelling_t2_is_computed_inside_the_graph(solder):
    torch.manual_seed(0)
    det = Detector(tiny_config(epochs=1)).fit(solder.normals)
    graph = ScoringGraph(det)
    np.testing.assert_array_equal(graph.g_precision.numpy(), det.hotelling_.precision.astype(np.float32))
    X = solder.test[0][:4]
    with torch.no_grad():
        t2 = graph(torch.from_numpy(X))[1].numpy()
    np.testing.assert_allclose(t2, det.score(X).t2, rtol=1e-4)


def test_anogan_and_a_corrupted_artifact_are_refused_with_one_line(solder, tmp_path):
    torch.manual_seed(0)
    det = Detector(tiny_config(family="anogan", epochs=1)).fit(solder.normals[:64])
    with pytest.raises(ExportError, match="AnoGAN cannot be exported: it scores by searching"):
        ScoringGraph(det)
    good = Detector(tiny_config(epochs=1)).fit(solder.normals[:64])
    folder = tmp_path / "model"
    artifacts.save(good, folder, {"round": 0})
    (folder / "weights.safetensors").write_bytes(b"not weights")
    with pytest.raises(artifacts.ArtifactError):
        export_onnx(folder, tmp_path / "out", solder.test[0][:4])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # trains or starts processes: make test runs it, make test-fast does not
def test_the_export_command_and_the_edge_command(trained_ws, tmp_path, capsys):
    ws_dir = tmp_path / "ws"
    shutil.copytree(trained_ws, ws_dir)
    assert run_cli("export", ws_dir, "--format", "onnx") == 0
    assert "ONNX Runtime matches the model on" in capsys.readouterr().out
    folder = ws_dir / "exports" / "r000-onnx"
    ws = Workspace.open(ws_dir)
    t = ws.images()
    pngs = []
    for i, img in enumerate(t.column("image").to_pylist()[:3]):
        (tmp_path / f"{i}.png").write_bytes(img)
        pngs.append(tmp_path / f"{i}.png")
    edge = subprocess.run([sys.executable, "-m", "aae_ray.edge", str(folder), *map(str, pngs)],
                          capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in edge.stdout.splitlines()]
    det = artifacts.load(ws.current_model_dir())
    from aae_ray.data.images import to_model_input

    want = det.score(to_model_input([p.read_bytes() for p in pngs], det.config.input_size), maps=False)
    np.testing.assert_allclose([r["score"] for r in lines], want.score, rtol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "aae_ray.edge", str(folder), str(tmp_path / "missing.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("aae-ray-edge: error:")
    assert run_cli("export", ws_dir, "--round", "7") == 2


@pytest.mark.slow  # trains or starts processes: make test runs it, make test-fast does not
def test_the_edge_scorer_runs_where_torch_cannot_be_imported(trained_ws, tmp_path):
    ws_dir = tmp_path / "ws"
    shutil.copytree(trained_ws, ws_dir)
    assert run_cli("export", ws_dir) == 0
    png = Workspace.open(ws_dir).images().column("image").to_pylist()[0]
    (tmp_path / "a.png").write_bytes(png)
    code = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "ray", "pyarrow"):
                    raise ImportError(f"{{name}} is not on this line box")
        sys.meta_path.insert(0, NoTorch())
        from aae_ray.edge import EdgeScorer
        r = EdgeScorer({str(ws_dir / 'exports' / 'r000-onnx')!r}).score([{str(tmp_path / 'a.png')!r}])
        assert "torch" not in sys.modules and "pyarrow" not in sys.modules
        print(r[0]["score"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


@pytest.mark.parametrize("policy", ["highest", "diverse"])
def test_score_on_onnx_runtime_writes_the_queue_torch_writes(scored_copy_path, policy):
    import pyarrow.parquet as pq

    from aae_ray.pool_scoring import score_pool

    ws = Workspace.open(scored_copy_path)
    _, torch_table = score_pool(ws, policy=policy, engine="local")
    path, onnx_table = score_pool(ws, policy=policy, engine="onnx")
    assert (ws.root / "exports" / "r000-onnx" / "model.onnx").exists()  # exported on first use
    assert onnx_table.column("id").to_pylist() == torch_table.column("id").to_pylist()
    np.testing.assert_allclose(onnx_table.column("score").to_numpy(), torch_table.column("score").to_numpy(),
                               rtol=1e-4)
    assert pq.read_table(path).num_rows == torch_table.num_rows


def test_a_recalibrated_model_is_exported_again(scored_copy_path):
    from aae_ray.export import ensure_export

    ws = Workspace.open(scored_copy_path)
    folder = ensure_export(ws, 0)
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert ensure_export(ws, 0) == folder and (folder / "model.onnx").stat().st_mtime_ns == stamp  # up to date
    score_json = ws.model_dir(0) / "score.json"
    limit = json.loads(score_json.read_text())
    limit["threshold"] *= 2  # what `aae-ray recalibrate` rewrites
    score_json.write_text(json.dumps(limit))
    ensure_export(ws, 0)
    assert json.loads((folder / "model.json").read_text())["threshold"] == limit["threshold"]


def test_the_endpoint_on_onnx_runtime_answers_what_torch_answers(scored_copy_path):
    from test_serving import call, pool_images

    from aae_ray import serving

    images = pool_images(scored_copy_path, 3)
    answers = {}
    for engine in ("torch", "onnx"):
        svc = serving.ScoringService(serving.settings(workspace=scored_copy_path, engine=engine, log=False))
        r = call(svc, "POST", "/score", images[1], {"content-type": "image/png"}, {"explain": "1"})
        assert r.status == 200
        answers[engine] = r.body["results"][0]
        assert call(svc, "GET", "/model", headers={}).body["device"] == (
            "cpu (onnxruntime)" if engine == "onnx" else "cpu")
    for k in ("score", "t2", "t2_local", "recon_error", "p_value"):
        assert answers["onnx"][k] == pytest.approx(answers["torch"][k], rel=1e-4, nan_ok=True), k
    assert answers["onnx"]["anomaly"] == answers["torch"]["anomaly"] and answers["onnx"]["heatmap"]

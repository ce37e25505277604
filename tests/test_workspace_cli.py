"""The workspace (DESIGN.md "The workspace"), the label events, the leakage rules and the command line contract:
init -> train -> score -> status, and one clear stderr line with exit code 2 for every bad argument or file."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_SET, run_cli
from PIL import Image

from aae_ray import artifacts, labels
from aae_ray.dataset import labeled_arrays, pool_arrays, training_arrays
from aae_ray.labels import LabelEvent, current_labels, read_events
from aae_ray.workspace import Workspace

AAE_RAY = Path(sys.executable).with_name("aae-ray")
IMAGES_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("height", pa.int32()),
                           ("width", pa.int32()), ("channels", pa.int32()), ("source", pa.string()),
                           ("split", pa.string()), ("truth", pa.int8()), ("mask", pa.binary())])


def images(ws: Path) -> pa.Table:
    return pq.read_table(ws / "data" / "images.parquet")


def ids_where(ws: Path, split: str, truth: int | None) -> list[str]:
    rows = images(ws).select(["id", "split", "truth"]).to_pylist()
    return [r["id"] for r in rows if r["split"] == split and r["truth"] == truth]


# --- init -------------------------------------------------------------------------------------------------------


def test_init_writes_the_image_table_with_the_design_schema(synthetic_ws):
    table = images(synthetic_ws)
    assert table.schema.equals(IMAGES_SCHEMA, check_metadata=False)
    assert table.num_rows == 144
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == 144
    assert {r["split"] for r in rows} == {"train", "val", "test", "pool"}
    assert sorted({r["truth"] for r in rows}) == [0, 1]
    assert sum(r["truth"] == 1 for r in rows) == 24
    assert all(r["image"].startswith(b"\x89PNG") for r in rows)
    assert all((r["height"], r["width"], r["channels"]) == (32, 32, 1) for r in rows)
    assert all(r["source"].startswith("synthetic:") for r in rows)


def test_init_records_the_import_in_workspace_yaml(synthetic_ws):
    settings = yaml.safe_load((synthetic_ws / "workspace.yaml").read_text())
    (entry,) = settings["imports"]
    assert entry["source"] == "synthetic"
    assert (entry["n_normal"], entry["n_defect"], entry["size"], entry["images"], entry["added"]) == (
        120, 24, 32, 144, 144)


def test_init_prints_a_one_line_summary(tmp_path, capsys):
    assert run_cli("init", tmp_path / "ws", "--source", "synthetic", "--n-normal", "10", "--n-defect", "0",
                   "--size", "32") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "10 images read, 10 new, 0 skipped" in last


def test_rerunning_init_is_idempotent(ws_copy, capsys):
    """Regression: merge_tables used to call new.take([]), which pyarrow types as null, so a re-run exited 2."""
    before = images(ws_copy)
    code = run_cli("init", ws_copy, "--source", "synthetic", "--n-normal", "120", "--n-defect", "24", "--size", "32")
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "144 images read, 0 new" in out.out
    assert images(ws_copy).equals(before)


def test_growing_an_import_adds_only_the_new_images(ws_copy, capsys):
    before = images(ws_copy)
    assert run_cli("init", ws_copy, "--source", "synthetic", "--n-normal", "130", "--n-defect", "24",
                   "--size", "32") == 0
    assert "154 images read, 10 new" in capsys.readouterr().out
    after = images(ws_copy)
    assert after.num_rows == 154
    assert after.slice(0, 144).equals(before)  # existing rows, splits included, are kept as they were


def test_folder_import_lists_a_corrupt_file_and_writes_the_report(tmp_path, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(normal / f"ok{i}.png")
    (normal / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ws = tmp_path / "ws"
    assert run_cli("init", ws, "--source", "folder", "--normal", normal) == 0
    out = capsys.readouterr().out
    assert f"skipped {normal / 'broken.png'}" in out
    assert "4 images read, 4 new, 1 skipped" in out
    report = json.loads((ws / "data" / "import_report.json").read_text())
    assert [Path(r["path"]).name for r in report] == ["broken.png"]
    assert report[0]["reason"]
    assert images(ws).num_rows == 4


# --- train, score, status ----------------------------------------------------------------------------------------


def test_train_writes_the_round_zero_model(trained_ws):
    model = trained_ws / "rounds" / "r000" / "model"
    assert {p.name for p in model.iterdir()} == {"weights.safetensors", "config.json", "t2.json", "score.json",
                                                 "local.safetensors", "metrics.json", "trained_on.parquet"}
    metrics = artifacts.read_metrics(model)
    assert metrics["round"] == 0
    assert {"val_auroc", "test_auroc", "trial", "data_fingerprint"} <= metrics.keys()
    assert 0 <= metrics["test_auroc"] <= 1  # the synthetic test split has both classes
    cfg = json.loads((model / "config.json").read_text())
    assert (cfg["epochs"], cfg["base_channels"], cfg["latent_dim"]) == (2, 8, 8)


def test_train_promotes_round_zero_in_current_json(trained_ws):
    current = json.loads((trained_ws / "current.json").read_text())
    assert current["round"] == 0
    assert current["model"] == "rounds/r000/model"
    assert (trained_ws / current["model"] / "config.json").exists()


def test_train_fingerprints_the_training_data(trained_ws):
    """Same workspace and labels -> same fingerprint; it names the data a model saw."""
    fp = artifacts.read_metrics(trained_ws / "rounds" / "r000" / "model")["data_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 16


def test_score_writes_the_queue_with_the_design_columns(scored_ws):
    table = pq.read_table(scored_ws / "rounds" / "r000" / "scores.parquet")
    # `score` (the primary score: the AAE's combined global and local T2) ranks the queue; `t2_local` beside it.
    assert table.column_names == ["id", "t2", "p_value", "anomaly", "rank", "score", "t2_local"]
    t2, local, score = (table.column(c).to_numpy() for c in ("t2", "t2_local", "score"))
    scales = json.loads((scored_ws / "rounds" / "r000" / "model" / "score.json").read_text())["scales"]
    np.testing.assert_allclose(score, np.maximum(t2 / scales["global"], local / scales["local"]), rtol=1e-12)
    assert table.schema.field("anomaly").type == pa.bool_()


def test_score_ranks_the_whole_pool_most_suspicious_first(scored_ws):
    rows = pq.read_table(scored_ws / "rounds" / "r000" / "scores.parquet").to_pylist()
    pool = {r["id"] for r in images(scored_ws).select(["id", "split"]).to_pylist() if r["split"] == "pool"}
    assert sorted(r["id"] for r in rows) == sorted(pool)
    assert sorted(r["rank"] for r in rows) == list(range(1, len(pool) + 1))
    score = {r["rank"]: r["score"] for r in rows}
    assert score[1] == max(score.values())
    assert all(score[k] >= score[k + 1] for k in range(1, len(rows)))
    assert [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)  # the file is the queue, in order


def test_score_with_an_empty_pool_writes_an_empty_queue(trained_ws, tmp_path):
    """A workspace without unlabeled images (a clean Fashion-MNIST import, say) still gets a queue file."""
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws, ignore=shutil.ignore_patterns("scores.parquet"))
    images = pq.read_table(ws / "data" / "images.parquet")
    pq.write_table(images.filter(pc.not_equal(images["split"], "pool")), ws / "data" / "images.parquet")
    assert run_cli("score", ws) == 0
    queue = pq.read_table(ws / "rounds" / "r000" / "scores.parquet")
    assert queue.num_rows == 0
    assert queue.column_names == ["id", "t2", "p_value", "anomaly", "rank", "score", "t2_local"]


def test_score_flags_and_p_values_come_from_the_promoted_model(scored_ws):
    det = artifacts.load(scored_ws / "rounds" / "r000" / "model")
    rows = pq.read_table(scored_ws / "rounds" / "r000" / "scores.parquet").to_pylist()
    pool = pool_arrays(Workspace.open(scored_ws), 32)
    s = det.score(pool.X)
    by_id = dict(zip(pool.ids, zip(s.t2, s.p_value, s.anomaly, strict=True), strict=True))
    for r in rows:
        t2, p, anomaly = by_id[r["id"]]
        assert r["t2"] == pytest.approx(t2) and r["p_value"] == pytest.approx(p) and r["anomaly"] == anomaly


def test_status_prints_the_round_and_the_current_model(scored_ws, capsys):
    assert run_cli("status", scored_ws) == 0
    out = capsys.readouterr().out
    assert "round 0 (current): val AUROC" in out
    assert "current model: rounds/r000/model (round 0)" in out
    assert "images: train " in out and "labels: none yet" in out


def test_status_without_a_model_says_so(synthetic_ws, capsys):
    assert run_cli("status", synthetic_ws) == 0
    assert "current model: none" in capsys.readouterr().out


# --- label events -----------------------------------------------------------------------------------------------


def event(id_: str, label: str, labeler: str = "ana") -> LabelEvent:
    return LabelEvent(id=id_, label=label, labeler=labeler, round=0, t2=12.5, model="rounds/r000/model")


def test_latest_label_event_wins(tmp_path):
    labels.append(tmp_path, [event("a", "defect"), event("b", "normal")])
    labels.append(tmp_path, [event("a", "normal", "ben")])
    assert current_labels(tmp_path) == {"a": "normal", "b": "normal"}


def test_undo_is_a_new_event_and_nothing_is_rewritten(tmp_path):
    first = labels.append(tmp_path, [event("a", "defect")])
    content = first.read_bytes()
    labels.append(tmp_path, [event("a", "skip")])  # the undo
    assert current_labels(tmp_path) == {"a": "skip"}
    assert first.read_bytes() == content
    assert [e["label"] for e in read_events(tmp_path).to_pylist()] == ["defect", "skip"]
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_label_events_keep_the_design_fields(tmp_path):
    labels.append(tmp_path, [event("a", "defect")])
    (row,) = read_events(tmp_path).to_pylist()
    assert row.keys() == {"id", "label", "labeler", "ts", "round", "t2", "model"}
    assert (row["id"], row["label"], row["labeler"], row["round"], row["t2"], row["model"]) == (
        "a", "defect", "ana", 0, 12.5, "rounds/r000/model")
    assert row["ts"].tzinfo is not None


def test_concurrent_labelers_all_persist(tmp_path):
    """Two people labeling at once: every write lands in its own file, none is lost."""
    start = threading.Barrier(2)

    def labeler(name: str) -> None:
        start.wait()
        for i in range(10):
            labels.append(tmp_path, [event(f"{name}-{i}", "defect", name)])

    threads = [threading.Thread(target=labeler, args=(n,)) for n in ("ana", "ben")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_events(tmp_path)) == 20
    assert len(current_labels(tmp_path)) == 20
    assert not list(tmp_path.glob(".*tmp"))


def test_unknown_label_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown label"):
        labels.append(tmp_path, [event("a", "maybe")])
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_no_events_write_no_file(tmp_path):
    assert labels.append(tmp_path / "labels", []) is None
    assert current_labels(tmp_path / "labels") == {}


# --- leakage rules: what training sees --------------------------------------------------------------------------


def test_a_pool_image_labeled_defect_trains_as_a_defect(ws_copy):
    ws = Workspace.open(ws_copy)
    pool_defect = ids_where(ws_copy, "pool", 1)[0]
    pool_normal = ids_where(ws_copy, "pool", 0)[0]
    before = training_arrays(ws, 32)
    y = dict(zip(before.ids, before.y.tolist(), strict=True))
    assert y[pool_defect] == 0  # pool truth is never read: presumed normal until someone says otherwise
    labels.append(ws.labels_dir, [event(pool_defect, "defect"), event(pool_normal, "defect")])
    after = dict(zip(*(lambda a: (a.ids, a.y.tolist()))(training_arrays(ws, 32)), strict=True))
    assert after[pool_defect] == 1 and after[pool_normal] == 1


def test_a_train_defect_relabeled_normal_trains_as_normal(ws_copy):
    ws = Workspace.open(ws_copy)
    train_defect = ids_where(ws_copy, "train", 1)[0]
    y = dict(zip(*(lambda a: (a.ids, a.y.tolist()))(training_arrays(ws, 32)), strict=True))
    assert y[train_defect] == 1  # import truth of a train image is a confirmed defect
    labels.append(ws.labels_dir, [event(train_defect, "normal")])
    y = dict(zip(*(lambda a: (a.ids, a.y.tolist()))(training_arrays(ws, 32)), strict=True))
    assert y[train_defect] == 0


def test_training_never_sees_val_or_test_images(synthetic_ws):
    ws = Workspace.open(synthetic_ws)
    train_ids = set(training_arrays(ws, 32).ids)
    held_out = set(labeled_arrays(ws, "val", 32).ids) | set(labeled_arrays(ws, "test", 32).ids)
    assert held_out and not train_ids & held_out
    splits = {r["id"]: r["split"] for r in images(synthetic_ws).select(["id", "split"]).to_pylist()}
    assert {splits[i] for i in train_ids} == {"train", "pool"}


def test_training_arrays_are_model_input(synthetic_ws):
    arr = training_arrays(Workspace.open(synthetic_ws), 32)
    assert arr.X.shape == (len(arr), 1, 32, 32) and arr.X.dtype == np.float32
    assert 0 <= arr.X.min() and arr.X.max() <= 1


# --- command line errors: exit 2, one line on stderr, no traceback ------------------------------------------


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aae-ray: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def run_console_script(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AAE_RAY_DEBUG", None)
    return subprocess.run([str(AAE_RAY), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def test_console_script_unknown_command():
    proc = run_console_script("frobnicate")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "invalid choice: 'frobnicate'")


def test_console_script_missing_workspace(tmp_path):
    proc = run_console_script("train", tmp_path / "nonexistent")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "is not an aae-ray workspace", "aae-ray init")


def test_console_script_out_of_range_override(synthetic_ws):
    proc = run_console_script("train", synthetic_ws, "--set", "conv_blocks=9")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "conv_blocks", "less than or equal to 5")


def cli_error(capsys, *args: str | Path) -> str:
    code = run_cli(*args)
    captured = capsys.readouterr()
    assert code == 2, captured
    return captured.err


def test_unknown_override_key(synthetic_ws, capsys):
    assert_one_error_line(cli_error(capsys, "train", synthetic_ws, "--set", "nope=1"), "nope", "known keys")


def test_broken_yaml_config(synthetic_ws, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("epochs: [1, 2\n")
    assert_one_error_line(cli_error(capsys, "train", synthetic_ws, "--config", config), str(config), "not valid YAML")


def test_missing_config_file(synthetic_ws, tmp_path, capsys):
    assert_one_error_line(cli_error(capsys, "train", synthetic_ws, "--config", tmp_path / "nope.yaml"),
                          "config file not found")


def test_score_before_any_model_is_promoted(synthetic_ws, capsys):
    assert_one_error_line(cli_error(capsys, "score", synthetic_ws), "no promoted model yet", "aae-ray train")


def test_fashion_mnist_without_normal_class(tmp_path, capsys):
    assert_one_error_line(cli_error(capsys, "init", tmp_path / "ws", "--source", "fashion-mnist"), "--normal-class")
    assert not (tmp_path / "ws").exists()


def test_folder_source_without_normal(tmp_path, capsys):
    assert_one_error_line(cli_error(capsys, "init", tmp_path / "ws", "--source", "folder"), "--normal DIR")


def test_folder_source_with_a_missing_normal_dir(tmp_path, capsys):
    assert_one_error_line(cli_error(capsys, "init", tmp_path / "ws", "--source", "folder", "--normal",
                                    tmp_path / "missing"), "normal folder", "does not exist")
    assert not (tmp_path / "ws").exists()


def test_folder_source_with_an_empty_normal_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_error_line(cli_error(capsys, "init", tmp_path / "ws", "--source", "folder", "--normal",
                                    tmp_path / "empty"), "no readable image")
    assert not (tmp_path / "ws").exists()


def test_status_of_a_missing_workspace(tmp_path, capsys):
    assert_one_error_line(cli_error(capsys, "status", tmp_path / "nope"), "is not an aae-ray workspace")


def test_zero_epochs_is_rejected(ws_copy, capsys):
    assert_one_error_line(cli_error(capsys, "train", ws_copy, "--epochs", "0", *TINY_SET, "--no-progress"),
                          "epochs")


def test_score_with_a_corrupt_model_is_one_error_line(trained_ws, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    (ws / "rounds" / "r000" / "model" / "weights.safetensors").write_bytes(b"garbage")
    assert_one_error_line(cli_error(capsys, "score", ws), "weights.safetensors")


@pytest.mark.parametrize("args", [["train"], ["train", "ws", "--epochs", "abc"], ["init", "ws", "--source", "bogus"]])
def test_bad_subcommand_arguments_are_one_line_naming_the_subcommand(args, capsys):
    """argparse's own errors: exit 2 and one line, prefixed with the subcommand ("aae-ray train: error:")."""
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"aae-ray {args[0]}: error:") and lines[0].endswith("(see --help)")

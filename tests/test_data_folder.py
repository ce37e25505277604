import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli
from PIL import Image

from aae_ray.data.folder import (
    IMAGE_SUFFIXES,
    Skipped,
    defect_splits,
    import_folders,
    mask_candidates,
    split_for,
    split_fraction,
)
from aae_ray.data.images import ImageRecord, decode_image, make_table, read_table, stable_id, write_table
from aae_ray.workspace import Workspace


def noise(shape: tuple[int, ...], seed: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def save(path: Path, pixels: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def normal_dir(tmp_path) -> Path:
    """Every supported kind of image plus the broken files an operator's folder tends to hold."""
    d = tmp_path / "normal"
    save(d / "gray.png", noise((30, 20), 1))
    save(d / "rgb.jpg", noise((16, 16, 3), 2), quality=90)
    save(d / "odd.bmp", noise((53, 37, 3), 3))
    save(d / "deep.tif", noise((12, 10), 4, np.uint16, 65536))
    save(d / "alpha.png", noise((8, 9, 4), 5))
    save(d / "sub" / "UPPER.PNG", noise((6, 7), 6))
    save(d / ".hidden" / "ignored.png", noise((6, 7), 7))
    (d / "truncated.png").write_bytes(png_bytes(noise((64, 64), 8))[:300])
    (d / "text.png").write_text("this is not an image\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("camera 3, shift B\n")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return d


def by_name(records) -> dict[str, object]:
    return {Path(r.source).name: r for r in records}


def test_imports_every_format_and_skips_broken_files(normal_dir):
    result = import_folders(normal=normal_dir)
    got = by_name(result.records)
    assert {name: r.pixels.shape for name, r in got.items()} == {
        "gray.png": (30, 20),
        "rgb.jpg": (16, 16, 3),
        "odd.bmp": (53, 37, 3),
        "deep.tif": (12, 10),
        "alpha.png": (8, 9, 3),
        "UPPER.PNG": (6, 7),
    }
    for r in result.records:
        assert r.pixels.dtype == np.uint8 and r.truth == 0 and r.split in ("train", "val", "test")
        assert os.path.isabs(r.source) and Path(r.source).is_file()
        assert r.id == stable_id("folder", hashlib.sha1(Path(r.source).read_bytes()).hexdigest())
    # 16-bit data is stretched to the full 8-bit range, not truncated to its low byte
    assert got["deep.tif"].pixels.min() == 0 and got["deep.tif"].pixels.max() == 255

    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert set(reasons) == {"truncated.png", "text.png", "empty.jpg", "notes.txt"}
    assert reasons["truncated.png"].startswith("cannot decode image")
    assert reasons["text.png"].startswith("cannot decode image")
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.txt"] == "not an image suffix"
    assert all(os.path.isabs(s.path) for s in result.skipped)
    make_table(result.records)  # the records fit the image table


def test_import_is_idempotent_and_survives_moving_files(normal_dir, tmp_path):
    a = import_folders(normal=normal_dir)
    b = import_folders(normal=normal_dir)
    assert [(r.id, r.split, r.source) for r in a.records] == [(r.id, r.split, r.source) for r in b.records]
    assert a.skipped == b.skipped

    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(normal_dir, moved)
    c = import_folders(normal=moved)
    assert {r.id: r.split for r in c.records} == {r.id: r.split for r in a.records}
    assert all(r.source.startswith(str(moved)) for r in c.records)


def test_duplicate_files_are_imported_once(tmp_path):
    normal, defect = tmp_path / "normal", tmp_path / "defect"
    first = save(normal / "a.png", noise((10, 10), 1))
    save(normal / "b.png", noise((10, 10), 2))
    save(defect / "real_defect.png", noise((10, 10), 3))
    (normal / "z").mkdir()
    shutil.copy(first, normal / "z" / "copy.png")
    shutil.copy(first, defect / "same_as_normal.png")

    result = import_folders(normal=normal, defect=defect)
    assert sorted(Path(r.source).name for r in result.records) == ["a.png", "b.png", "real_defect.png"]
    assert result.skipped == [
        Skipped(str(normal / "z" / "copy.png"), f"duplicate of {first}"),
        Skipped(str(defect / "same_as_normal.png"), f"duplicate of {first}"),
    ]


def test_labels_and_splits_by_folder(tmp_path):
    normal, defect, unlabeled = tmp_path / "n", tmp_path / "d", tmp_path / "u"
    for i in range(12):
        save(normal / f"{i}.png", noise((5, 5), 100 + i))
    for i in range(3):
        save(defect / f"{i}.png", noise((5, 5), 200 + i))
    for i in range(4):
        save(unlabeled / f"{i}.png", noise((5, 5), 300 + i))

    records = import_folders(normal=normal, defect=defect, unlabeled=unlabeled).records
    kinds = {"n": 0, "d": 1, "u": None}
    for r in records:
        assert r.truth == kinds[Path(r.source).parent.name]
        if r.truth is None:
            assert r.split == "pool"
        elif r.truth == 0:
            assert r.split == split_for(split_fraction(r.id), "normal")
    assert "val" in [r.split for r in records if r.truth == 1]
    assert len(records) == 19 and len({r.id for r in records}) == 19


def test_split_shares_follow_the_fractions():
    ids = [stable_id("x", str(i)) for i in range(20000)]
    for kind, expected in (("normal", (0.70, 0.15, 0.15)), ("defect", (0.30, 0.35, 0.35))):
        splits = [split_for(split_fraction(i), kind) for i in ids]
        shares = [splits.count(s) / len(ids) for s in ("train", "val", "test")]
        assert np.allclose(shares, expected, atol=0.015), (kind, shares)
    assert split_for(0.0, "normal") == "train" and split_for(0.7, "normal") == "val"
    assert split_for(0.85, "normal") == "test" and split_for(0.999999, "defect") == "test"
    assert split_for(0.5, "unlabeled") == "pool"
    with pytest.raises(ValueError, match="unknown kind 'weird'"):
        split_for(0.5, "weird")


def test_defect_splits_put_at_least_one_defect_in_val():
    ids = [stable_id("d", str(i)) for i in range(200)]
    outside = [i for i in ids if split_for(split_fraction(i), "defect") != "val"]
    pair = outside[:2]
    splits = defect_splits(pair)
    assert splits.count("val") == 1
    # the one moved is the one nearest the val band [0.30, 0.65)
    dist = [max(0.30 - split_fraction(i), split_fraction(i) - 0.65) for i in pair]
    assert splits[int(np.argmin(dist))] == "val"
    assert defect_splits(pair) == splits  # deterministic
    assert defect_splits(outside[:1]) == [split_for(split_fraction(outside[0]), "defect")]  # one: left alone
    for k in range(0, 150, 3):
        assert "val" in defect_splits(ids[k : k + 3])
    natural = [split_for(split_fraction(i), "defect") for i in ids]
    assert defect_splits(ids) == natural  # untouched when val already has defects


def test_missing_folder_is_named(tmp_path, normal_dir):
    with pytest.raises(FileNotFoundError, match="normal folder .*nope"):
        import_folders(normal=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="defect folder .*absent"):
        import_folders(normal=normal_dir, defect=tmp_path / "absent")


def test_normal_folder_without_readable_images_is_an_error(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "bad.png").write_text("nope")
    with pytest.raises(ValueError, match="no readable image .* in normal folder"):
        import_folders(normal=d)


def test_suffixes_are_lowercase_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)


# --- ground-truth masks ------------------------------------------------------------------------------------------


def blob_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A 0/255 rectangle somewhere in the image, different per seed."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    mask = np.zeros(shape, dtype=np.uint8)
    mask[y : y + h // 3, x : x + w // 4] = 255
    return mask


@pytest.fixture
def mvtec(tmp_path) -> Path:
    """MVTec AD's layout: train/good, test/<kind>/NNN.png, ground_truth/<kind>/NNN_mask.png (test/good unmasked)."""
    root = tmp_path / "mvtec" / "bottle"
    for i in range(6):
        save(root / "train" / "good" / f"{i:03d}.png", noise((24, 32), 10 + i))
    for kind, seeds in (("broken", (20, 21)), ("crack", (22, 23, 24))):
        for j, seed in enumerate(seeds):
            save(root / "test" / kind / f"{j:03d}.png", noise((24, 32), seed))
            save(root / "ground_truth" / kind / f"{j:03d}_mask.png", blob_mask((24, 32), seed))
    return root


def test_mvtec_masks_round_trip_through_init(mvtec, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run_cli("init", ws, "--source", "folder", "--normal", mvtec / "train" / "good", "--defect",
                   mvtec / "test", "--mask", mvtec / "ground_truth") == 0
    out = capsys.readouterr().out
    assert "masks for 5 of 5 defect images" in out and "0 skipped" in out
    rows = read_table(ws / "data" / "images.parquet").select(["source", "truth", "height", "width", "mask"])
    rows = rows.to_pylist()
    assert sum(r["truth"] == 1 for r in rows) == 5
    for r in rows:
        if r["truth"] == 0:
            assert r["mask"] is None
            continue
        kind, name = Path(r["source"]).parent.name, Path(r["source"]).stem
        expected = np.asarray(Image.open(mvtec / "ground_truth" / kind / f"{name}_mask.png"))
        assert np.array_equal(decode_image(r["mask"]), expected), r["source"]
        assert (r["height"], r["width"]) == expected.shape
    (entry,) = yaml.safe_load((ws / "workspace.yaml").read_text())["imports"]
    assert entry["mask"] == str((mvtec / "ground_truth").resolve())


def test_masks_at_the_same_relative_path_and_as_png_beside_jpeg(tmp_path):
    # VisA keeps JPEG images and PNG masks under the same relative names; a mask may also be any nonzero value.
    normal, defect, masks = tmp_path / "n", tmp_path / "d", tmp_path / "m"
    save(normal / "a.png", noise((16, 16), 1))
    save(defect / "x" / "same.png", noise((16, 16), 2))
    save(defect / "y" / "photo.jpg", noise((16, 16, 3), 3), quality=95)
    save(defect / "z" / "unannotated.png", noise((16, 16), 4))
    one = blob_mask((16, 16), 5) // 255  # a 0/1 label image
    save(masks / "x" / "same.png", one)
    save(masks / "y" / "photo.png", blob_mask((16, 16), 6))
    result = import_folders(normal=normal, defect=defect, mask=masks)
    got = {Path(r.source).name: r.mask for r in result.records}
    assert np.array_equal(got["same.png"], one * 255)
    assert np.array_equal(got["photo.jpg"], blob_mask((16, 16), 6))
    assert got["unannotated.png"] is None and got["a.png"] is None
    assert result.skipped == []
    make_table(result.records)  # the masks fit the image table


def test_mask_candidates_order():
    assert mask_candidates(Path("k/001.png")) == [Path("k/001.png"), Path("k/001_mask.png")]
    assert mask_candidates(Path("k/001.JPG")) == [Path("k/001.JPG"), Path("k/001_mask.JPG"), Path("k/001.png"),
                                                  Path("k/001_mask.png")]


def test_a_mask_of_the_wrong_size_or_broken_is_skipped_with_a_reason(mvtec, tmp_path, capsys):
    wrong = mvtec / "ground_truth" / "broken" / "000_mask.png"
    save(wrong, blob_mask((12, 16), 20))
    broken = mvtec / "ground_truth" / "crack" / "001_mask.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a mask")
    ws = tmp_path / "ws"
    assert run_cli("init", ws, "--source", "folder", "--normal", mvtec / "train" / "good", "--defect",
                   mvtec / "test", "--mask", mvtec / "ground_truth") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.strip().startswith("skipped")]
    assert len(lines) == 2, captured.out
    size_line = next(line for line in lines if str(wrong) in line)
    assert "not used" in size_line and "16x12 pixels" in size_line and "32x24" in size_line
    assert "cannot decode" in next(line for line in lines if str(broken) in line)
    assert "masks for 3 of 5 defect images" in captured.out
    # The images themselves are imported, only without a mask.
    rows = read_table(ws / "data" / "images.parquet").select(["source", "truth", "mask"]).to_pylist()
    no_mask = sorted(Path(r["source"]).parent.name + "/" + Path(r["source"]).name
                     for r in rows if r["truth"] == 1 and r["mask"] is None)
    assert no_mask == ["broken/000.png", "crack/001.png"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--mask", "{root}/ground_truth"], "needs a defect folder"),
        (["--defect", "{root}/test", "--mask", "{root}/nowhere"], "mask folder"),
        (["--defect", "{root}/test", "--mask", "{root}/train"], "no defect image has a mask"),
        (["--defect", "{root}/test", "--mask", "{root}/test"], "is the defect folder"),
    ],
)
def test_mask_folder_mistakes_are_one_error_line(mvtec, tmp_path, capsys, extra, fragment):
    args = [a.format(root=mvtec) for a in extra]
    code = run_cli("init", tmp_path / "ws", "--source", "folder", "--normal", mvtec / "train" / "good", *args)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aae-ray: error:") and fragment in lines[0], err
    assert not (tmp_path / "ws").exists()


def test_an_image_table_without_the_mask_column_still_reads_and_merges(tmp_path):
    old_records = [ImageRecord(f"old{i}", noise((8, 8), i), "old", "train", 0) for i in range(3)]
    path = tmp_path / "ws" / "data" / "images.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(make_table(old_records).drop_columns(["mask"]), path)  # as written before masks existed
    table = read_table(path)
    assert table.column_names[-1] == "mask" and table.column("mask").null_count == 3
    assert table.drop_columns(["mask"]).equals(pq.read_table(path))

    mask = blob_mask((8, 8), 1)
    new = ImageRecord("new", noise((8, 8), 9), "new", "test", 1, mask=mask)
    (tmp_path / "ws" / "workspace.yaml").write_text("version: 1\nimports: []\n")
    ws, added = Workspace.import_records(tmp_path / "ws", [*old_records, new], {"source": "test"})
    assert added == 1
    merged = {r["id"]: r["mask"] for r in ws.images().select(["id", "mask"]).to_pylist()}
    assert [merged[f"old{i}"] for i in range(3)] == [None] * 3
    assert np.array_equal(decode_image(merged["new"]), mask)
    write_table(ws.images(), path)  # and the merged table writes back with the full schema
    assert pq.read_table(path).schema.field("mask").type == read_table(path).schema.field("mask").type


def test_a_mask_that_does_not_fit_its_record_is_refused():
    record = ImageRecord("a", noise((8, 8), 1), "x", "test", 1, mask=np.zeros((8, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match="mask of image a"):
        make_table([record])

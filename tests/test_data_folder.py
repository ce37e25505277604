import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aae_ray.data.folder import (
    IMAGE_SUFFIXES,
    Skipped,
    defect_splits,
    import_folders,
    split_for,
    split_fraction,
)
from aae_ray.data.images import make_table, stable_id


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

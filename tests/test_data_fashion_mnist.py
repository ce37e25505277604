import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from aae_ray.data.fashion_mnist import (
    CLASSES,
    DEFAULT_IDX_DIR,
    deepsad_split,
    fashion_mnist_records,
    load_fashion_mnist,
    read_idx,
)
from aae_ray.data.images import make_table

_TYPE_BYTE = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, _TYPE_BYTE[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_labels(per_class: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))


def write_fake_dataset(folder: Path, train_per_class: int = 10, test_per_class: int = 3) -> None:
    """Tiny Fashion-MNIST lookalike; mixes .gz and raw names on purpose."""
    rng = np.random.default_rng(0)
    y_train, y_test = fake_labels(train_per_class), fake_labels(test_per_class)
    folder.mkdir(exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (len(y_train), 28, 28), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", y_train.astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (len(y_test), 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y_test.astype(np.uint8))


# --- read_idx ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[1, -2, 70000], [3, 4, -70000]], dtype=np.int32),
        np.array([0.5, -1.25], dtype=np.float32),
    ],
)
def test_read_idx_round_trip(tmp_path, name, arr):
    out = read_idx(write_idx(tmp_path / name, arr))
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # writable, not a view of the file's bytes


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    path = tmp_path / "labels"  # no .gz suffix, gzipped content
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an IDX"),
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX"),  # magic must start 0000
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX"),  # unknown type byte
        (b"\x00\x00\x08\x00", "not an IDX"),  # zero dimensions
        (b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "truncated IDX data"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "trailing bytes"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, data, match):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    full = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# --- load_fashion_mnist -----------------------------------------------------------------------------------


def test_load_reads_gz_and_raw_names(tmp_path):
    write_fake_dataset(tmp_path)
    x_train, y_train, x_test, y_test = load_fashion_mnist(tmp_path)
    assert x_train.shape == (100, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (30, 28, 28) and x_test.dtype == np.uint8
    np.testing.assert_array_equal(y_train, fake_labels(10))
    np.testing.assert_array_equal(y_test, fake_labels(3))


def test_load_missing_folder_says_how_to_install(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(folder)
    msg = str(err.value)
    assert str(folder) in msg
    assert "dataset-fashion-mnist" in msg and "apt-get install" in msg and "--idx-dir" in msg


def test_load_names_the_missing_file(tmp_path):
    write_fake_dataset(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_load_rejects_mismatched_labels(tmp_path):
    write_fake_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist(tmp_path)


# --- deepsad_split ----------------------------------------------------------------------------------------

Y_TRAIN = fake_labels(200)
Y_TEST = fake_labels(20)


def train_sets(s) -> dict[str, np.ndarray]:
    names = ["train_normal", "pool_normal", "pool_anomaly", "labeled_anomaly", "val_normal", "val_anomaly"]
    return {n: getattr(s, n) for n in names}


@pytest.mark.parametrize(("pollution", "labeled_ratio"), [(0.0, 0.0), (0.0, 0.05), (0.1, 0.0), (0.2, 0.1)])
def test_split_is_disjoint_and_follows_the_formulas(pollution, labeled_ratio):
    k = 3
    s = deepsad_split(
        Y_TRAIN, Y_TEST, normal_class=k, pollution=pollution, labeled_ratio=labeled_ratio, seed=5
    )
    sets = train_sets(s)
    merged = np.concatenate(list(sets.values()))
    assert len(np.unique(merged)) == len(merged), "index sets overlap"
    for idx in sets.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)

    assert len(s.val_normal) == 20 and len(s.val_anomaly) == 4
    assert np.all(Y_TRAIN[s.val_normal] == k) and np.all(Y_TRAIN[s.val_anomaly] != k)
    unlabeled_normal = s.train_normal if pollution == 0 else s.pool_normal
    assert len(s.pool_normal if pollution == 0 else s.train_normal) == 0
    assert sorted(np.concatenate([unlabeled_normal, s.val_normal])) == list(np.flatnonzero(Y_TRAIN == k))

    n = len(unlabeled_normal)
    assert len(s.pool_anomaly) == round(pollution * n / (1 - pollution))
    assert np.all(Y_TRAIN[s.pool_anomaly] != k)
    if pollution:
        assert math.isclose(len(s.pool_anomaly) / (n + len(s.pool_anomaly)), pollution, abs_tol=1 / n)

    n_unlabeled = n + len(s.pool_anomaly)
    assert len(s.labeled_anomaly) == round(labeled_ratio * n_unlabeled / (1 - labeled_ratio))
    assert s.labeled_class != k and np.all(Y_TRAIN[s.labeled_anomaly] == s.labeled_class)
    np.testing.assert_array_equal(s.test, np.arange(len(Y_TEST)))


def test_split_is_deterministic_for_a_seed():
    kw = dict(normal_class=0, pollution=0.1, labeled_ratio=0.05)
    a, b = deepsad_split(Y_TRAIN, Y_TEST, seed=7, **kw), deepsad_split(Y_TRAIN, Y_TEST, seed=7, **kw)
    for name, idx in train_sets(a).items():
        np.testing.assert_array_equal(idx, getattr(b, name))
    assert a.labeled_class == b.labeled_class
    c = deepsad_split(Y_TRAIN, Y_TEST, seed=8, **kw)
    assert not np.array_equal(a.pool_anomaly, c.pool_anomaly)


def test_val_does_not_move_with_pollution_or_labeled_class():
    a = deepsad_split(Y_TRAIN, Y_TEST, normal_class=2, seed=3)
    b = deepsad_split(
        Y_TRAIN, Y_TEST, normal_class=2, pollution=0.2, labeled_ratio=0.1, labeled_class=9, seed=3
    )
    np.testing.assert_array_equal(a.val_normal, b.val_normal)
    np.testing.assert_array_equal(a.val_anomaly, b.val_anomaly)


def test_default_labeled_class_is_drawn_from_the_other_classes():
    drawn = {deepsad_split(Y_TRAIN, Y_TEST, normal_class=4, seed=s).labeled_class for s in range(30)}
    assert 4 not in drawn and drawn <= set(range(10)) and len(drawn) > 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(normal_class=10), r"normal_class=10 .*0\.\.9"),
        (dict(normal_class=-1), r"normal_class=-1 .*0\.\.9"),
        (dict(normal_class=0, pollution=0.5), r"pollution=0\.5 .*\[0, 0\.5\)"),
        (dict(normal_class=0, pollution=-0.1), r"pollution=-0\.1"),
        (dict(normal_class=0, pollution=float("nan")), r"pollution=nan"),
        (dict(normal_class=0, labeled_ratio=0.5), r"labeled_ratio=0\.5 .*\[0, 0\.5\)"),
        (dict(normal_class=0, labeled_class=0), r"labeled_class=0 .*\[1, 2"),
        (dict(normal_class=0, labeled_class=10), r"labeled_class=10"),
        (dict(normal_class=0, val_fraction=1.0), r"val_fraction=1\.0"),
        # 180 unlabeled normals + 120 pollution -> 288 labeled wanted, one class has < 200 left
        (dict(normal_class=0, pollution=0.4, labeled_ratio=0.49, labeled_class=1), r"need 288 labeled"),
    ],
)
def test_split_rejects_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        deepsad_split(Y_TRAIN, Y_TEST, **kw)


# --- fashion_mnist_records --------------------------------------------------------------------------------


def split_truth(records) -> set[tuple[str, int | None]]:
    return {(r.split, r.truth) for r in records}


def test_records_clean_protocol_trains_on_normals(tmp_path):
    write_fake_dataset(tmp_path, train_per_class=50)
    records = fashion_mnist_records(normal_class=1, idx_dir=tmp_path)
    assert split_truth(records) == {("train", 0), ("val", 0), ("val", 1), ("test", 0), ("test", 1)}
    assert sum(r.split == "train" for r in records) == 45
    assert sum(r.split == "test" for r in records) == 30
    assert len({r.id for r in records}) == len(records)
    for r in records:
        origin, index, label = r.source.split(":")[1:]
        assert r.truth == (int(label) != 1) and origin in ("train", "test") and int(index) >= 0
        assert r.pixels.shape == (28, 28) and r.pixels.dtype == np.uint8
    make_table(records)  # fits the image table's schema


def test_records_polluted_protocol_uses_the_pool(tmp_path):
    write_fake_dataset(tmp_path, train_per_class=50)
    records = fashion_mnist_records(normal_class=1, idx_dir=tmp_path, pollution=0.1, labeled_ratio=0.1)
    assert {(s, t) for s, t in split_truth(records) if s in ("train", "pool")} == {
        ("train", 1),
        ("pool", 0),
        ("pool", 1),
    }
    assert sum(r.split == "pool" for r in records) == 45 + 5
    assert sum(r.split == "train" for r in records) == round(0.1 * 50 / 0.9)


def test_record_ids_depend_only_on_the_image(tmp_path):
    write_fake_dataset(tmp_path)
    a = {r.source.rsplit(":", 1)[0]: r.id for r in fashion_mnist_records(normal_class=0, idx_dir=tmp_path)}
    b = {
        r.source.rsplit(":", 1)[0]: r.id
        for r in fashion_mnist_records(normal_class=5, idx_dir=tmp_path, seed=9)
    }
    shared = a.keys() & b.keys()
    assert len(shared) > 20 and all(a[key] == b[key] for key in shared)


# --- the real files ---------------------------------------------------------------------------------------


def test_real_fashion_mnist_end_to_end():
    if not DEFAULT_IDX_DIR.is_dir():
        pytest.skip(f"{DEFAULT_IDX_DIR} absent (apt-get install -y dataset-fashion-mnist)")
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * len(CLASSES)
    assert np.bincount(y_test).tolist() == [1000] * len(CLASSES)
    s = deepsad_split(y_train, y_test, normal_class=0, pollution=0.1, labeled_ratio=0.05, seed=0)
    counts = {name: len(idx) for name, idx in train_sets(s).items()}
    assert counts == {
        "train_normal": 0,
        "pool_normal": 5400,
        "pool_anomaly": 600,
        "labeled_anomaly": 316,
        "val_normal": 600,
        "val_anomaly": 120,
    }

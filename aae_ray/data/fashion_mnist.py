"""Fashion-MNIST from its IDX files, split by the Deep SAD protocol (Ruff et al. 2020).

One class K is normal, the other nine are anomalies. The import knows every image's class, so `truth` is
always set; what training may read is decided by the split (`pool` truth is for simulation only).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aae_ray.data import DEFECT, NORMAL
from aae_ray.data.images import ImageRecord, stable_id

DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gzipped or raw (told apart by content, not by name).

    Returns:
        A writable array in native byte order with the file's shape and dtype.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: bad gzip stream, bad magic number, or a size that disagrees with the header.
    """
    data = Path(path).read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream: {exc}") from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic {data[:4].hex() or 'empty'}; expected 0000 + type byte in "
            f"{[f'{t:02x}' for t in _IDX_DTYPES]} + number of dimensions >= 1)"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise ValueError(f"{path}: {what} IDX data ({len(data)} bytes, header {shape} says {expected})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(
    idx_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the official Fashion-MNIST splits.

    Args:
        idx_dir: folder holding the four IDX files, `.gz` or uncompressed; default `DEFAULT_IDX_DIR`.

    Returns:
        x_train uint8 (60000, 28, 28), y_train int64 (60000,), x_test uint8 (10000, 28, 28), y_test int64.

    Raises:
        FileNotFoundError: a file is missing (the message says how to install the data).
        ValueError: a file is corrupt or the arrays do not fit together.
    """
    folder = Path(idx_dir) if idx_dir is not None else DEFAULT_IDX_DIR
    found = {key: _find_idx(folder, stem) for key, stem in _FILES.items()}
    missing = [_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(m + '[.gz]' for m in missing)}); "
            "install Debian's package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist) "
            "or pass --idx-dir"
        )
    arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(
                f"{found[f'x_{part}']}: expected uint8 (N, 28, 28) images, got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{found[f'y_{part}']}: expected {len(x)} labels, got shape {y.shape}")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(CLASSES):
            raise ValueError(f"{found[f'y_{part}']}: labels outside 0..{len(CLASSES) - 1}")
    return (
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
    )


@dataclass(frozen=True)
class DeepSADSplit:
    """Index arrays (sorted int64) into x_train, except `test` which indexes x_test.

    Unlabeled normals land in `train_normal` when there is no pollution (clean one-class training) and in
    `pool_normal` otherwise, so exactly one of the two is empty. `pool_anomaly` is the pollution.
    """

    train_normal: np.ndarray
    pool_normal: np.ndarray
    pool_anomaly: np.ndarray
    labeled_anomaly: np.ndarray
    val_normal: np.ndarray
    val_anomaly: np.ndarray
    test: np.ndarray
    labeled_class: int


def _check_fraction(name: str, value: float, high: float) -> None:
    if not 0.0 <= value < high:  # also rejects NaN
        raise ValueError(f"{name}={value!r} is outside the allowed range [0, {high})")


def _take(rng: np.random.Generator, candidates: np.ndarray, n: int, what: str) -> np.ndarray:
    if n > len(candidates):
        raise ValueError(f"need {n} {what} but only {len(candidates)} are left; lower the ratio")
    return np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)


def _anomaly_classes(normal_class: int, labeled_class: int | None) -> list[int]:
    """Every class but `normal_class`, after checking that both class arguments are allowed."""
    classes = range(len(CLASSES))
    if normal_class not in classes:
        raise ValueError(
            f"normal_class={normal_class!r} is not a class index; allowed: 0..{len(CLASSES) - 1}"
        )
    others = [c for c in classes if c != normal_class]
    if labeled_class is not None and labeled_class not in others:
        raise ValueError(
            f"labeled_class={labeled_class!r} must be an anomaly class; allowed: {others} "
            f"(0..{len(CLASSES) - 1} except normal_class={normal_class})"
        )
    return others


def _independent_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """`n` generators whose streams do not depend on each other, all derived from `seed`."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _normal_and_anomaly(y_train: np.ndarray, normal_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Train indices of the normal class and of all the others; there must be normal images."""
    normal = np.flatnonzero(y_train == normal_class)
    if len(normal) == 0:
        raise ValueError(f"no train images of normal_class={normal_class}")
    return normal, np.flatnonzero(y_train != normal_class)


def _draw_val(
    rng: np.random.Generator, normal: np.ndarray, anomaly: np.ndarray, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Val normals (`val_fraction` of the normals) and one val anomaly per five of them."""
    val_normal = _take(rng, normal, round(val_fraction * len(normal)), "val normals")
    return val_normal, _take(rng, anomaly, len(val_normal) // 5, "val anomalies")


def _draw_share(rng: np.random.Generator, candidates: np.ndarray, share: float, n: int, what: str) -> np.ndarray:
    """As many of `candidates` as make up `share` of themselves plus `n` others: m / (n + m) = share, rounded."""
    return _take(rng, candidates, round(share * n / (1.0 - share)), what)


def _draw_labeled(
    rng: np.random.Generator,
    anomaly: np.ndarray,
    y_train: np.ndarray,
    labeled_class: int,
    labeled_ratio: float,
    n_unlabeled: int,
) -> np.ndarray:
    """Anomalies of `labeled_class`, as many as make up `labeled_ratio` of them plus the unlabeled images."""
    of_class = anomaly[y_train[anomaly] == labeled_class]
    return _draw_share(rng, of_class, labeled_ratio, n_unlabeled, f"labeled anomalies of class {labeled_class}")


def _place_unlabeled_normals(unlabeled_normal: np.ndarray, pollution: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_normal, pool_normal): without pollution the normals are clean training data, else pool images."""
    empty = np.empty(0, dtype=np.int64)
    return (unlabeled_normal, empty) if pollution == 0 else (empty, unlabeled_normal)


def deepsad_split(
    y_train: np.ndarray,
    y_test: np.ndarray,
    *,
    normal_class: int,
    pollution: float = 0.0,
    labeled_ratio: float = 0.0,
    labeled_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DeepSADSplit:
    """Split Fashion-MNIST indices by the Deep SAD protocol with one normal class.

    Args:
        y_train: train labels 0..9.
        y_test: test labels 0..9; every test image is used.
        normal_class: the normal class K.
        pollution: share of anomalies among the unlabeled train images, in [0, 0.5).
        labeled_ratio: Deep SAD's gamma_l = m / (n + m) for m labeled anomalies and n unlabeled images.
        labeled_class: the one class the labeled anomalies come from; default drawn with `seed`.
        val_fraction: share of K's train images held out for validation, in [0, 1).
        seed: every draw derives from it, so the split is reproducible.

    Raises:
        ValueError: a parameter is out of range, or there are too few images for the requested counts.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    others = _anomaly_classes(normal_class, labeled_class)
    _check_fraction("pollution", pollution, 0.5)
    _check_fraction("labeled_ratio", labeled_ratio, 0.5)
    _check_fraction("val_fraction", val_fraction, 1.0)
    # One independent stream per draw: changing pollution must not move the val set, and naming the
    # labeled class explicitly must not change the pollution.
    rng_val, rng_class, rng_pollution, rng_labeled = _independent_rngs(seed, 4)
    normal, anomaly = _normal_and_anomaly(y_train, normal_class)
    val_normal, val_anomaly = _draw_val(rng_val, normal, anomaly, val_fraction)
    # Each later draw takes only what the earlier ones left, so no image is in two parts.
    unlabeled_normal, anomaly = np.setdiff1d(normal, val_normal), np.setdiff1d(anomaly, val_anomaly)
    pool_anomaly = _draw_share(rng_pollution, anomaly, pollution, len(unlabeled_normal), "polluting anomalies")
    anomaly = np.setdiff1d(anomaly, pool_anomaly)
    labeled_class = int(rng_class.choice(others)) if labeled_class is None else labeled_class
    n_unlabeled = len(unlabeled_normal) + len(pool_anomaly)
    labeled_anomaly = _draw_labeled(rng_labeled, anomaly, y_train, labeled_class, labeled_ratio, n_unlabeled)
    train_normal, pool_normal = _place_unlabeled_normals(unlabeled_normal, pollution)
    return DeepSADSplit(
        train_normal=train_normal,
        pool_normal=pool_normal,
        pool_anomaly=pool_anomaly,
        labeled_anomaly=labeled_anomaly,
        val_normal=val_normal,
        val_anomaly=val_anomaly,
        test=np.arange(len(y_test), dtype=np.int64),
        labeled_class=int(labeled_class),
    )


def _records(
    x: np.ndarray, y: np.ndarray, origin: str, indices: np.ndarray, split: str, normal_class: int
) -> Iterator[ImageRecord]:
    for i in indices.tolist():
        label = int(y[i])
        yield ImageRecord(
            id=stable_id("fashion-mnist", origin, str(i)),
            pixels=x[i],
            source=f"fashion-mnist:{origin}:{i}:{label}",
            split=split,
            truth=NORMAL if label == normal_class else DEFECT,
        )


def fashion_mnist_records(
    *,
    normal_class: int,
    idx_dir: Path | None = None,
    pollution: float = 0.0,
    labeled_ratio: float = 0.0,
    labeled_class: int | None = None,
    seed: int = 0,
) -> list[ImageRecord]:
    """Fashion-MNIST as image records, split by `deepsad_split`.

    Unlabeled normals go to `train` (truth 0) when pollution is 0; otherwise they and the pollution go to
    `pool`, truth kept for simulation. Labeled anomalies go to `train` (truth 1), val to `val`, and the
    whole official test split to `test`. `source` is "fashion-mnist:<train|test>:<index>:<class index>";
    ids depend only on the origin split and index, so an image keeps its id across seeds and protocols.
    """
    x_train, y_train, x_test, y_test = load_fashion_mnist(idx_dir)
    s = deepsad_split(
        y_train,
        y_test,
        normal_class=normal_class,
        pollution=pollution,
        labeled_ratio=labeled_ratio,
        labeled_class=labeled_class,
        seed=seed,
    )
    parts = [
        ("train", s.train_normal, "train"),
        ("train", s.labeled_anomaly, "train"),
        ("train", s.pool_normal, "pool"),
        ("train", s.pool_anomaly, "pool"),
        ("train", s.val_normal, "val"),
        ("train", s.val_anomaly, "val"),
    ]
    records = [
        r
        for origin, idx, split in parts
        for r in _records(x_train, y_train, origin, idx, split, normal_class)
    ]
    records += _records(x_test, y_test, "test", s.test, "test", normal_class)
    return records

"""The image table (`WS/data/images.parquet`): one declared schema, PNG bytes, atomic writes."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from aae_ray.atomic import atomic_write
from aae_ray.data import SPLITS

# Decoding and preprocessing live in pixels.py (no pyarrow, no torch: the edge scorer needs them alone).
from aae_ray.data.pixels import ImageTooLarge, decode_image, to_model_input, to_uint8  # noqa: F401

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("truth", pa.int8()),  # nullable: 1 defect, 0 normal, null unknown
        ("mask", pa.binary()),  # nullable PNG, uint8 255 = defect pixel: for evaluation only, never for training
    ]
)
# Tables written before masks existed lack only the last column; read_table fills it with nulls.
_SCHEMA_WITHOUT_MASK = pa.schema([f for f in SCHEMA if f.name != "mask"])


@dataclass(frozen=True)
class ImageRecord:
    """One image ready for the table. `pixels` is uint8, (H, W) gray or (H, W, 3) RGB; `mask`, if known, is
    (H, W) with nonzero (bool True, or 255) where the defect is."""

    id: str
    pixels: np.ndarray
    source: str
    split: str
    truth: int | None
    mask: np.ndarray | None = None


def stable_id(*parts: str | bytes) -> str:
    """A short id that depends only on its parts, so re-importing gives the same ids."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode_png(pixels: np.ndarray) -> bytes:
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        msg = f"expected uint8 (H, W) or (H, W, C) pixels, got {pixels.dtype} {pixels.shape}"
        raise ValueError(msg)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_table(records: list[ImageRecord]) -> pa.Table:
    """Records -> an Arrow table with SCHEMA. Ids must be unique and splits known."""
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image ids in one import")
    bad = {r.split for r in records} - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)}; allowed: {list(SPLITS)}")
    return pa.table(
        {
            "id": ids,
            "image": [encode_png(r.pixels) for r in records],
            "height": [r.pixels.shape[0] for r in records],
            "width": [r.pixels.shape[1] for r in records],
            "channels": [1 if r.pixels.ndim == 2 else r.pixels.shape[2] for r in records],
            "source": [r.source for r in records],
            "split": [r.split for r in records],
            "truth": [r.truth for r in records],
            "mask": [None if r.mask is None else _mask_png(r.mask, r.pixels.shape[:2], r.id) for r in records],
        },
        schema=SCHEMA,
    )


def _mask_png(mask: np.ndarray, shape: tuple[int, ...], image_id: str) -> bytes:
    """A mask as a 0/255 PNG; any nonzero value counts as defect, so bool and 0/1 masks store alike."""
    if mask.shape != shape:
        raise ValueError(f"the mask of image {image_id} is {mask.shape}, its image {shape}")
    return encode_png(np.where(mask > 0, 255, 0).astype(np.uint8))


def write_table(table: pa.Table, path: Path) -> None:
    write_table_with(table, path, SCHEMA)


def write_table_with(table: pa.Table, path: Path, schema: pa.Schema) -> None:
    """Write atomically: a reader never sees half a file, a killed writer leaves the old one."""
    atomic_write(path, lambda f: pq.write_table(table.cast(schema), f))


def read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"no image table at {path}; run `aae-ray init` first")
    table = pq.read_table(path)
    if table.schema.equals(_SCHEMA_WITHOUT_MASK, check_metadata=False):
        table = table.append_column(SCHEMA.field("mask"), pa.nulls(table.num_rows, pa.binary()))
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(f"{path} does not have the image schema {SCHEMA.names}")
    return table


def merge_tables(old: pa.Table, new: pa.Table) -> pa.Table:
    """Append rows whose id is not in `old` yet (idempotent re-import)."""
    known = set(old.column("id").to_pylist())
    keep = [i for i, id_ in enumerate(new.column("id").to_pylist()) if id_ not in known]
    return pa.concat_tables([old, new.take(pa.array(keep, type=pa.int64()))])


def mask_arrays(masks: list[bytes | None], size: int) -> np.ndarray:
    """Mask PNGs (None: no defect pixel) -> float32 (N, size, size) in {0, 1}, aligned with to_model_input.

    Resized with to_model_input's own filter (antialiased bilinear) on the 0/1 mask, then thresholded at 0.5: a
    model pixel is defect when at least half of its weighted footprint is, the same footprint its intensity came
    from. Nearest would sample one source pixel (biased half a pixel on even factors) and drop or keep thin
    defects by where they fall.
    """
    out = np.zeros((len(masks), size, size), dtype=np.float32)
    for i, data in enumerate(masks):
        if data is None:
            continue
        pixels = decode_image(data)
        gray = pixels.max(axis=2) if pixels.ndim == 3 else pixels
        img = Image.fromarray((gray > 0).astype(np.float32))  # mode F
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        out[i] = np.asarray(img, dtype=np.float32) >= 0.5
    return out

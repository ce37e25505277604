"""Import plain image folders: one of normal images, optionally one of defects and one of unlabeled images,
and a folder of ground-truth masks for the defects.

Ids come from the file bytes and splits from the ids, so re-importing the same files (even moved or renamed)
gives the same rows, and `merge_tables` keeps the import idempotent.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aae_ray.data import DEFECT, NORMAL
from aae_ray.data.images import ImageRecord, decode_image, stable_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Split shares by kind: defects are scarce, so most go to val/test where they make thresholds and reports
# meaningful; the few in train are the labeled anomalies.
_SHARES = {
    "normal": (("train", 0.70), ("val", 0.15), ("test", 0.15)),
    "defect": (("train", 0.30), ("val", 0.35), ("test", 0.35)),
}
_TRUTH = {"normal": NORMAL, "defect": DEFECT, "unlabeled": None}
# PIL names the in-memory buffer in its errors; its address would make reasons differ between runs.
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Skipped:
    """A file that was not imported, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class FolderImport:
    """What `import_folders` found: the records to add, and the files it left out."""

    records: list[ImageRecord]
    skipped: list[Skipped]


def _walk(folder: Path) -> list[Path]:
    """Files under `folder` in a fixed order, hidden files and folders (.git, .DS_Store) left out."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def split_fraction(image_id: str) -> float:
    """A uniform number in [0, 1) from an id; salted so it does not just follow the id's sort order."""
    h = stable_id("split", image_id)
    return int(h, 16) / 16 ** len(h)


def split_for(fraction: float, kind: str) -> str:
    """The split a fraction falls in for `kind` ("normal", "defect" or "unlabeled")."""
    if kind == "unlabeled":
        return "pool"
    if kind not in _SHARES:
        raise ValueError(f"unknown kind {kind!r}; allowed: {[*_SHARES, 'unlabeled']}")
    upper = 0.0
    for split, share in _SHARES[kind]:
        upper += share
        if fraction < upper:
            return split
    return _SHARES[kind][-1][0]  # float rounding can leave the shares summing just under 1


def defect_splits(ids: list[str]) -> list[str]:
    """Splits for defect ids; with 2 or more defects at least one is in val.

    When the hash puts none in val, the defect whose fraction lies nearest the val band moves there (ties by
    id), which depends only on the set of ids, so it is reproducible.
    """
    splits = [split_for(split_fraction(i), "defect") for i in ids]
    if len(ids) >= 2 and "val" not in splits:
        lo = _SHARES["defect"][0][1]
        hi = lo + _SHARES["defect"][1][1]
        fractions = [split_fraction(i) for i in ids]
        distance = [max(lo - f, f - hi, 0.0) for f in fractions]
        nearest = min(range(len(ids)), key=lambda k: (distance[k], ids[k]))
        splits[nearest] = "val"
    return splits


def _read(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes, or None and the reason it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    return (data, "") if data else (None, "empty file")


def _decode(data: bytes) -> tuple[np.ndarray | None, str]:
    """The pixels, or None and the reason the bytes are not a usable image."""
    try:
        pixels = decode_image(data)
    except ValueError as exc:
        return None, _BUFFER_REPR.sub("", str(exc))
    except Exception as exc:  # mode conversion of exotic files raises other types; skip, don't stop
        return None, _BUFFER_REPR.sub("", f"cannot decode image: {exc}")
    if pixels.size == 0:
        return None, f"zero-sized image {pixels.shape}"
    return pixels, ""


def mask_candidates(rel: Path) -> list[Path]:
    """Where the mask of the defect image at `rel` (relative to the defect folder) may be, relative to the mask
    folder, first found wins: the same path (masks mirroring the images), MVTec AD's `<name>_mask` beside it,
    and both as .png, since masks stay lossless when the images are JPEG (VisA's layout)."""
    stems = [rel.stem, f"{rel.stem}_mask"]
    suffixes = [rel.suffix] if rel.suffix.lower() == ".png" else [rel.suffix, ".png"]
    return [rel.with_name(stem + suffix) for suffix in suffixes for stem in stems]


def _check_mask_folder(mask: Path, defect: Path | None) -> None:
    if defect is None:
        raise ValueError("a mask folder needs a defect folder: masks belong to the defect images")
    if mask.resolve() == Path(defect).resolve():
        raise ValueError(f"the mask folder {mask} is the defect folder: every image would be its own mask")


def _with_mask(record: ImageRecord, rel: Path, mask_dir: Path, skipped: list[Skipped]) -> tuple[ImageRecord, bool]:
    """The record with its mask from `mask_dir` if there is a usable one (a broken one goes to `skipped`), and
    whether there was a mask file at all."""
    path = next((mask_dir / c for c in mask_candidates(rel) if (mask_dir / c).is_file()), None)
    if path is None:
        return record, False
    mask, why = _read_mask(path, record.pixels.shape[:2])
    if mask is None:
        skipped.append(Skipped(os.path.abspath(path), f"mask of {record.source} not used: {why}"))
        return record, True
    return replace(record, mask=mask), True


def _read_mask(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """The mask as uint8 0/255 (any nonzero value is defect: 0/255 and 0/1 label masks alike), or None and why."""
    data, why = _read(path)
    if data is None:
        return None, why
    pixels, why = _decode(data)
    if pixels is None:
        return None, why
    if pixels.shape[:2] != shape:
        return None, f"it is {pixels.shape[1]}x{pixels.shape[0]} pixels, the image {shape[1]}x{shape[0]}"
    gray = pixels.max(axis=2) if pixels.ndim == 3 else pixels
    return np.where(gray > 0, 255, 0).astype(np.uint8), ""


# (kind, id, record) of an image found, before its split is set: defects get theirs as a group.
_Found = tuple[str, str, ImageRecord]


def _check_folders(folders: dict[str, Path | None]) -> None:
    """Every folder given (by kind) must exist."""
    for kind, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{kind} folder {folder} does not exist or is not a folder")


def content_id(data: bytes) -> str:
    """An image's id from its bytes: the same file, or the same bytes the line sent, gets the same id."""
    return stable_id("folder", hashlib.sha1(data).hexdigest())


def _load(path: Path, source: str, first_path: dict[str, str]) -> tuple[str, np.ndarray] | Skipped:
    """The id and pixels of the image file at `path`, or why it is skipped: not an image suffix, unreadable, a
    duplicate of an id in `first_path` (checked before decoding, so a copy is never decoded), or undecodable."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return Skipped(source, "not an image suffix")
    data, why = _read(path)
    if data is None:
        return Skipped(source, why)
    image_id = content_id(data)
    if image_id in first_path:
        return Skipped(source, f"duplicate of {first_path[image_id]}")
    pixels, why = _decode(data)
    if pixels is None:
        return Skipped(source, why)
    return image_id, pixels


def _scan(folders: dict[str, Path | None], mask_dir: Path | None) -> tuple[list[_Found], list[Skipped], int]:
    """Every image in `folders` (with its mask, for defects when `mask_dir` is given), the files skipped in the
    order met, and how many defect images had a mask file, usable or not."""
    found: list[_Found] = []
    skipped: list[Skipped] = []
    mask_files = 0
    first_path: dict[str, str] = {}  # id -> path it was imported from
    for kind, folder in folders.items():
        if folder is None:
            continue
        for path in _walk(Path(folder)):
            source = os.path.abspath(path)
            loaded = _load(path, source, first_path)
            if isinstance(loaded, Skipped):
                skipped.append(loaded)
                continue
            image_id, pixels = loaded
            first_path[image_id] = source
            record = ImageRecord(image_id, pixels, source, "", _TRUTH[kind])
            if kind == "defect" and mask_dir is not None:
                record, matched = _with_mask(record, path.relative_to(folder), mask_dir, skipped)
                mask_files += matched
            found.append((kind, image_id, record))
    return found, skipped, mask_files


def _check_found(found: list[_Found], normal: Path, mask: Path | None, mask_files: int) -> None:
    """The scan must have found a normal image and, when there is a mask folder, at least one mask file."""
    if not any(kind == "normal" for kind, _, _ in found):
        raise ValueError(f"no readable image ({', '.join(IMAGE_SUFFIXES)}) in normal folder {normal}")
    if mask is not None and mask_files == 0:
        # Not one match is a wrong folder or layout, not a few unannotated defects.
        raise ValueError(f"no defect image has a mask in {mask} (expected the same relative path as the image, "
                         f"or MVTec's <name>_mask.png)")


def _with_splits(found: list[_Found]) -> list[ImageRecord]:
    """The records with their splits: by hash each, except that defects are split as a group (`defect_splits`)."""
    defect_ids = [i for kind, i, _ in found if kind == "defect"]
    split_of = dict(zip(defect_ids, defect_splits(defect_ids), strict=True))
    return [replace(r, split=split_of.get(i) or split_for(split_fraction(i), kind)) for kind, i, r in found]


def import_folders(
    *, normal: Path, defect: Path | None = None, unlabeled: Path | None = None, mask: Path | None = None
) -> FolderImport:
    """Import images from folders, walked recursively in sorted order.

    Normal images get truth 0 and split train/val/test 70/15/15, defects truth 1 and 30/35/35, unlabeled
    images truth None and split `pool`. Ids are `stable_id("folder", sha1 of the bytes)`; a file identical to
    one already imported is skipped. Unreadable or undecodable files and non-image files are reported in
    `skipped` and the import goes on.

    `mask` is a folder of ground-truth masks of the defect images (see `mask_candidates` for how a mask is
    found; nonzero pixels are defect). A defect image without a mask file gets none. A mask that cannot be
    read or decoded, or whose size differs from its image's, is reported in `skipped` and the image is
    imported without a mask: a broken annotation should not cost the image, which training can still use.

    Raises:
        FileNotFoundError: a given folder does not exist.
        ValueError: `normal` holds no readable image; `mask` without `defect`, or no defect image has a mask.
    """
    folders = {"normal": normal, "defect": defect, "unlabeled": unlabeled}
    _check_folders({**folders, "mask": mask})
    if mask is not None:
        _check_mask_folder(Path(mask), defect)
    found, skipped, mask_files = _scan(folders, None if mask is None else Path(mask))
    _check_found(found, normal, mask, mask_files)
    return FolderImport(records=_with_splits(found), skipped=skipped)

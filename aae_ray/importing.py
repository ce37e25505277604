"""Import: images from a source into a workspace's `data/images.parquet` (DESIGN.md "Import").

One function a source: procedural solder joints (synthetic), Fashion-MNIST by the Deep SAD protocol, the
user's own folders, or the images the line sent to `aae-ray serve` (its prediction log). Each renders or reads
its records, writes them with `Workspace.import_records` (idempotent: ids already there are kept) and returns
what happened; `aae-ray init` and `aae-ray ingest` print it, `aae-ray demo` calls the same.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from aae_ray.workspace import Workspace

Echo = Callable[[str], None]
LINE_SOURCE = "line:"  # a line image's `source` is "line:<station>" (`line` below)


@dataclass(frozen=True)
class Imported:
    ws: Workspace
    n_read: int
    n_added: int
    splits: dict[str, int]
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for each file that could not be read


def synthetic(root: Path, *, seed: int = 0, n_normal: int = 800, n_defect: int = 80, size: int = 128,
              echo: Echo = print) -> Imported:
    from aae_ray.data.synthetic import make_synthetic_records

    echo(f"rendering {n_normal} normal and {n_defect} defect solder joints (seed {seed})")
    records = make_synthetic_records(seed=seed, n_normal=n_normal, n_defect=n_defect, size=size)
    source = {"source": "synthetic", "seed": seed, "n_normal": n_normal, "n_defect": n_defect, "size": size}
    return _write(root, records, source, [])


def fashion_mnist(root: Path, *, normal_class: int | None, pollution: float = 0.0, labeled_ratio: float = 0.0,
                  seed: int = 0, idx_dir: Path | None = None) -> Imported:
    from aae_ray.data.fashion_mnist import fashion_mnist_records

    if normal_class is None:
        raise ValueError("--source fashion-mnist needs --normal-class K (0-9)")
    records = fashion_mnist_records(normal_class=normal_class, idx_dir=idx_dir, pollution=pollution,
                                    labeled_ratio=labeled_ratio, seed=seed)
    source = {"source": "fashion-mnist", "normal_class": normal_class, "pollution": pollution,
              "labeled_anomaly_ratio": labeled_ratio, "seed": seed, "idx_dir": str(idx_dir) if idx_dir else None}
    return _write(root, records, source, [])


def folders(root: Path, *, normal: Path | None, defect: Path | None = None, unlabeled: Path | None = None,
            mask: Path | None = None, echo: Echo = print) -> Imported:
    from aae_ray.data.folder import import_folders

    if normal is None:
        raise ValueError("--source folder needs --normal DIR")
    echo(f"reading images under {normal}" + (f", {defect}" if defect else "") + (f", {unlabeled}" if unlabeled else ""))
    result = import_folders(normal=normal, defect=defect, unlabeled=unlabeled, mask=mask)
    records = result.records
    if mask:
        n_mask, n_defect = sum(r.mask is not None for r in records), sum(r.truth == 1 for r in records)
        echo(f"  masks for {n_mask} of {n_defect} defect images from {mask}")
    for s in result.skipped:
        echo(f"  skipped {s.path}: {s.reason}")
    source = {"source": "folder", "normal": str(normal.resolve()), "defect": _resolved(defect),
              "unlabeled": _resolved(unlabeled), "mask": _resolved(mask)}
    return _write(root, records, source, [{"path": s.path, "reason": s.reason} for s in result.skipped])


def _resolved(path: Path | None) -> str | None:
    return str(path.resolve()) if path else None


def _write(root: Path, records: list, source: dict, skipped: list[dict]) -> Imported:
    ws, added = Workspace.import_records(root, records, source, skipped)
    return Imported(ws, len(records), added, dict(Counter(r.split for r in records)), skipped)


def line(root: Path, *, since: datetime | None = None, which: str = "flagged", sample: float | None = None,
         seed: int = 0, ids: Collection[str] | None = None, echo: Echo = print) -> Imported:
    """The line's logged images (WS/predictions/, aae_ray.prediction_log) into the pool, so the next `aae-ray
    score` and round queue them. `which`: "flagged" (the anomalies) or "all" (every row that kept its bytes);
    `sample`: a seeded share of those instead; `ids`: only these content ids, flagged or not (`which` and
    `sample` do not apply; an id whose bytes were not logged is named and skipped). Idempotent: the ids are
    content ids, so an image is added once."""
    import pyarrow.compute as pc

    from aae_ray.data.images import ImageRecord, decode_image
    from aae_ray.prediction_log import UNNAMED_STATION, read_predictions

    if which not in ("flagged", "all"):
        raise ValueError(f"which must be flagged or all, got {which!r}")
    if sample is not None and not 0.0 < sample <= 1.0:
        raise ValueError(f"--sample must be in (0, 1], got {sample}")
    ws = Workspace.open(root)
    # `since` reads only the files from its hour on: a long-running line's log is mostly older
    table = read_predictions(ws.predictions_dir, columns=["ts", "id", "station", "anomaly", "image"], since=since)
    keep = pc.is_valid(table.column("image"))
    chosen = None if ids is None else sorted({ids} if isinstance(ids, str) else set(ids))
    if chosen is not None:
        which, sample = f"{len(chosen)} chosen id(s)", None
        keep = pc.and_(keep, pc.is_in(table.column("id"), pa.array(chosen, pa.string())))
    elif which == "flagged":
        keep = pc.and_(keep, table.column("anomaly"))
    rows = table.filter(keep).to_pylist()
    rows = list({r["id"]: r for r in rows}.values())  # one a content id: the line sends a part more than once
    if sample is not None:
        rows = random.Random(seed).sample(rows, round(sample * len(rows)))
    records, skipped = [], [{"path": f"predictions/{i}", "reason": "no logged image bytes with this id"}
                            for i in sorted(set(chosen or ()) - {r["id"] for r in rows})]
    for r in rows:
        try:
            records.append(ImageRecord(id=r["id"], pixels=decode_image(r["image"]), split="pool", truth=None,
                                       source=f"{LINE_SOURCE}{r['station'] or UNNAMED_STATION}"))
        except ValueError as exc:  # the server decoded it once; a damaged log row is skipped, not fatal
            skipped.append({"path": f"predictions/{r['id']}", "reason": str(exc)})
    echo(f"{len(records)} line image(s) from {ws.predictions_dir} ({which}"
         + (f", a sample of {sample:.0%}" if sample is not None else "")
         + (f", since {since.isoformat()}" if since else "") + ")")
    source = {"source": "line", "which": which, "sample": sample, "since": since.isoformat() if since else None}
    if chosen is not None:
        source["which"], source["n_ids"] = "chosen", len(chosen)
    return _write(root, records, source, skipped)

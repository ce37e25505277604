"""One inspection task's folder (DESIGN.md): images, labels, rounds and the promoted model.

Everything is a file a person can open: YAML settings, Parquet tables, JSON pointers. Writes are atomic
(temp file + rename), so a killed process leaves the previous state, never half a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from aae_ray import atomic
from aae_ray.data.images import ImageRecord, make_table, merge_tables, read_table, write_table

ROUND_RE = re.compile(r"^r(\d{3,})$")


class WorkspaceError(ValueError):
    """The folder is not a workspace, or its state does not allow the command."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    # --- layout ----------------------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / "workspace.yaml"

    @property
    def images_path(self) -> Path:
        return self.root / "data" / "images.parquet"

    @property
    def labels_dir(self) -> Path:
        return self.root / "labels"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def alarms_dir(self) -> Path:
        return self.root / "alarms"

    @property
    def current_path(self) -> Path:
        return self.root / "current.json"

    def round_dir(self, n: int) -> Path:
        return self.root / "rounds" / f"r{n:03d}"

    def model_dir(self, n: int) -> Path:
        return self.round_dir(n) / "model"

    # --- life cycle ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str) -> Workspace:
        ws = cls(Path(root))
        if not ws.settings_path.exists() or not ws.images_path.exists():
            raise WorkspaceError(f"{root} is not an aae-ray workspace (run `aae-ray init {root} ...` first)")
        return ws

    @classmethod
    def import_records(
        cls, root: Path | str, records: list[ImageRecord], source: dict[str, Any], report: list[dict] | None = None
    ) -> tuple[Workspace, int]:
        """Create the workspace or add to it; rows whose id is already there are kept as they are.

        Returns the workspace and the number of images added."""
        ws = cls(Path(root))
        if ws.root.exists() and not ws.root.is_dir():
            raise WorkspaceError(f"{root} exists and is not a folder")
        new = make_table(records)
        old = read_table(ws.images_path) if ws.images_path.exists() else None
        table = new if old is None else merge_tables(old, new)
        added = table.num_rows - (0 if old is None else old.num_rows)
        write_table(table, ws.images_path)
        settings = ws.settings() if ws.settings_path.exists() else {"version": 1, "imports": []}
        entry = {**source, "at": now(), "images": len(records), "added": added, "skipped": len(report or [])}
        settings["imports"].append(entry)
        write_text(ws.settings_path, yaml.safe_dump(settings, sort_keys=False))
        if report:
            write_text(ws.root / "data" / "import_report.json", json.dumps(report, indent=2) + "\n")
        return ws, added

    # --- reading ---------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.settings_path.read_text())
        except yaml.YAMLError as exc:
            raise WorkspaceError(f"{self.settings_path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or "imports" not in data:
            raise WorkspaceError(f"{self.settings_path} is not an aae-ray workspace file")
        return data

    def images(self) -> pa.Table:
        return read_table(self.images_path)

    def pool_ids(self) -> set[str]:
        """The ids of the pool's images (read without the image bytes)."""
        import pyarrow.parquet as pq

        t = pq.read_table(self.images_path, columns=["id", "split"])
        return {i for i, s in zip(t.column("id").to_pylist(), t.column("split").to_pylist(), strict=True)
                if s == "pool"}

    def rounds(self) -> list[int]:
        folder = self.root / "rounds"
        if not folder.exists():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := ROUND_RE.match(p.name)))

    def current(self) -> dict[str, Any] | None:
        if not self.current_path.exists():
            return None
        try:
            return json.loads(self.current_path.read_text())
        except json.JSONDecodeError as exc:
            raise WorkspaceError(f"{self.current_path} is not valid JSON: {exc}") from None

    def current_model_dir(self) -> Path:
        cur = self.current()
        if cur is None:
            raise WorkspaceError(f"{self.root} has no promoted model yet (run `aae-ray train {self.root}`)")
        return self.root / cur["model"]

    # --- writing ---------------------------------------------------------------------------------------
    def promote(self, n: int, reason: str) -> None:
        if not (self.model_dir(n) / "config.json").exists():
            raise WorkspaceError(f"round {n} has no model to promote")
        pointer = {"round": n, "model": f"rounds/r{n:03d}/model", "promoted_at": now(), "reason": reason}
        write_text(self.current_path, json.dumps(pointer, indent=2) + "\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)

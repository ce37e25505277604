"""Write a file so that readers see the old version or the whole new one, never a part, even after a crash.

temporary file beside the target (hidden, unique to this writer) -> flush + fsync -> os.replace -> fsync the
folder (so the rename itself survives a power cut). Used for the image table, the queues, the label fragments
and exports, and the workspace's small JSON/YAML files.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call `write(f)` on a binary temporary file, then move it into place. `before_replace` is a test hook."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Starts with "." so folder scans ignore it; pid + random part keep concurrent writers apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; folders cannot be opened for fsync on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

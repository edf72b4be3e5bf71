"""All-or-nothing file writes: a file is either its old self or completely new, never half written.

Every write that matters (images, label maps, manifests, model bundles, checkpoints, tables, PNGs)
goes through :func:`atomic_write`: ``write`` fills a hidden temporary file in the destination folder
(the same file system, so the rename is atomic), which is then renamed over the destination. The
temporary name ends with the final name, so writers that choose the format by suffix (SimpleITK,
matplotlib) choose the same one. A failure or an interrupt removes the temporary file; a killed
process can leave one behind, which stores recognise by :data:`TEMP_PREFIX` and clean up.

Example::

    atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    atomic_write_text(root / "dataset.json", json.dumps(manifest), durable=True)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEMP_PREFIX", "atomic_write", "atomic_write_text", "fsync_file", "temporary_sibling"]

#: Start of every temporary name (hidden on POSIX).
TEMP_PREFIX = ".scdl-tmp-"


def temporary_sibling(path: Path) -> Path:
    """A new, unused name next to ``path`` that starts with :data:`TEMP_PREFIX` and ends with ``path.name``."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Write ``path`` through a temporary sibling that ``write`` fills, then rename it into place.

    Args:
        path: the destination; its folder is created if missing.
        write: writes the complete content to the path it is given.
        durable: flush the content to disk before the rename, for files that others rely on after a
            power cut (manifests, model.json); slower.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (opened for writing: Windows needs that)."""
    with open(path, "r+b") as handle:
        os.fsync(handle.fileno())

"""All-or-nothing file writes: a file is either its old self or completely new, never half written.

Every write that matters (images, label maps, manifests, model bundles, checkpoints, tables, PNGs)
goes through :func:`atomic_write`: ``write`` fills a hidden temporary file in the destination folder
(the same file system, so the rename is atomic), which is then renamed over the destination. The
temporary name ends with the final name, so writers that choose the format by suffix (SimpleITK,
matplotlib) choose the same one. A failure or an interrupt removes the temporary file; a killed
process can leave one behind, which the next writer of the store or run removes
(:func:`remove_stale_temporaries`: the name holds the writer's process id).

Example::

    atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    atomic_write_text(root / "dataset.json", json.dumps(manifest), durable=True)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "atomic_write_text",
    "fsync_file",
    "remove_stale_temporaries",
    "temporary_sibling",
]

#: Start of every temporary name (hidden on POSIX).
TEMP_PREFIX = ".scdl-tmp-"


def temporary_sibling(path: Path) -> Path:
    """A new, unused name next to ``path`` that starts with :data:`TEMP_PREFIX` and ends with ``path.name``."""
    return path.with_name(f"{temporary_prefix()}{uuid.uuid4().hex[:8]}-{path.name}")


def temporary_prefix() -> str:
    """:data:`TEMP_PREFIX` with this process's id: what :func:`remove_stale_temporaries` reads back."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries (files or folders) in ``folder`` whose writer process no longer runs.

    A process killed mid-write (kill -9, power cut) leaves its temporary behind; the next writer of the same
    store or run calls this. A temporary of a live process, this one included, is kept: it may be mid-write.

    Returns:
        The paths removed.
    """
    import psutil

    removed = []
    for entry in folder.glob(f"{TEMP_PREFIX}*") if folder.is_dir() else ():
        match = re.match(re.escape(TEMP_PREFIX) + r"(\d+)-", entry.name)
        if match is None or psutil.pid_exists(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


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
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` (of the same type) saying which file could not be written: a bare "[Errno 28] No space left on
    device" from a write call names none, and the temporary's name would mean nothing to the user."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason += " (the disk is full: free some space and try again)"
    message = f"Could not write {path}: {reason}; it was left as it was"
    try:
        return type(err)(err.errno, message) if err.errno is not None else type(err)(message)
    except TypeError:  # a subclass with another constructor
        return OSError(err.errno, message)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (opened for writing: Windows needs that)."""
    with open(path, "r+b") as handle:
        os.fsync(handle.fileno())

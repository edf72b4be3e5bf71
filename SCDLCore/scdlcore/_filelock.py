"""An exclusive inter-process lock on a file: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows.

The operating system releases the lock when its holder exits or is killed, so a crashed writer never
leaves a store locked. The lock file itself is left in place (deleting it would race with a waiting
process that already opened it).

Example::

    with file_lock(root / "dataset.json.lock", timeout_s=120):
        ...  # read, change and atomically rewrite the manifest
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_lock"]

_POLL_S = 0.05


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs.

    Args:
        path: the lock file.
        timeout_s: give up after this many seconds; None waits as long as it takes.

    Raises:
        TimeoutError: another process held the lock for ``timeout_s`` seconds.
    """
    path = Path(path)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(path, "a+b") as handle:
        while not _try_lock(handle):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{path} is locked by another program (waited {timeout_s:g} s); "
                    "try again when it has finished writing."
                )
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            _unlock(handle)


def _try_lock(handle) -> bool:
    """Take the lock without blocking; False if another process holds it."""
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # the first byte stands for the file
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

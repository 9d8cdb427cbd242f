"""Files that several processes share: atomic writes, and an exclusive lock for jobs that share one
output folder (``train --fold i`` run as a job array: the first job to take the lock prepares the
data, the fold assignment and the MLflow parent run; the others, waiting on it, find them made).

``write_atomic``: a reader sees the old file or the whole new one, never a part, even after a power
loss. ``exclusive``: ``fcntl.flock`` on a lock file beside the data: released by the kernel when the process ends, even
on SIGKILL, so a killed job never leaves a folder locked. It works on local file systems and on the
shared ones clusters mount (NFSv4, Lustre, GPFS, BeeGFS with flock enabled).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lung_effnet.errors import InputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block; waits for it,
    saying so (a warning: a job may wait hours) when another process holds it (``what``: what the
    lock guards, for that line).

    Raises:
        InputError: the file system does not support locks (one line, naming the folder).
    """
    fd = _open_lock(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.monotonic()
            log.warning("waiting for another job to finish %s (%s)", what or "its work", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.warning("waited %.0f s for %s", time.monotonic() - started, path)
        except OSError as exc:
            raise _no_locks(Path(path), exc) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def try_lock(path: str | Path, busy: str) -> int:
    """Take an exclusive lock on ``path`` now, or raise ``InputError(busy)`` when another process
    holds it. Returns the open file descriptor: the lock lasts until it is closed (or the process ends)."""
    fd = _open_lock(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(busy) from None
    except OSError as exc:
        os.close(fd)
        raise _no_locks(Path(path), exc) from None
    return fd


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _no_locks(path: Path, exc: OSError) -> InputError:
    return InputError(f"cannot lock {path} ({exc.strerror or type(exc).__name__}): jobs sharing {path.parent} need a "
                      f"file system with file locks (flock); put the output folder on one that has them")


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def temporary_beside(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file in ``path``'s folder, to be renamed onto ``path``, with
    the permissions an ``open(path, "w")`` would give (``mkstemp`` makes it owner-only, 0600: a
    summary or a cache entry would then differ from the other outputs, and a group could not read a
    shared cache)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the whole new one, even on power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

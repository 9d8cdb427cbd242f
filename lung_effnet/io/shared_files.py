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
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block; waits for it,
    saying so once when another process holds it (``what``: what the lock guards, for that line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.monotonic()
            log.info("waiting for another job to finish %s (%s)", what or "its work", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("waited %.0f s for %s", time.monotonic() - started, path)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the whole new one, even on power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

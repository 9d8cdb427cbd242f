"""Files shared between processes: atomic writes get the permissions a plain write gets (``mkstemp``
alone makes them owner-only), and the folder lock excludes a second holder until the first lets go."""

from __future__ import annotations

import multiprocessing
import os
import time

from lung_effnet.io.shared_files import exclusive, write_atomic


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "summary.json", "{}\n")
        (tmp_path / "predictions.csv").write_text("a\n")
    finally:
        os.umask(old)
    mode = (tmp_path / "summary.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "predictions.csv").stat().st_mode & 0o777 == 0o644


def _hold(path, seconds, started):
    with exclusive(path):
        started.set()
        time.sleep(seconds)


def test_the_lock_waits_for_another_process(tmp_path):
    lock = tmp_path / ".lock"
    started = multiprocessing.get_context("fork").Event()
    other = multiprocessing.get_context("fork").Process(target=_hold, args=(lock, 1.0, started))
    other.start()
    assert started.wait(30)
    t0 = time.monotonic()
    with exclusive(lock, "a test"):
        waited = time.monotonic() - t0
    other.join()
    assert waited > 0.5  # it waited for the holder to let go

"""Decode workers keep freed blocks for reuse (``prepare.reuse_freed_memory``) instead of mapping fresh,
page-faulting memory for every tensor of every series."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import numpy as np
from lung_effnet.scoring.prepare import init_worker

class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallocInfo
if sys.argv[1] == "worker":
    init_worker()
mapped = libc.mallinfo2().hblks
block = np.empty(int(sys.argv[2]) << 20, np.uint8)  # a tensor's worth, held while counting
print(libc.mallinfo2().hblks - mapped)
"""


def _blocks_mapped_for(role: str, mib: int) -> int:
    """How many new ``mmap``-ed blocks one ``mib`` MiB allocation takes in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PROBE, role, str(mib)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2); the setting is glibc's alone")
def test_a_worker_takes_tensors_of_up_to_32_mib_from_its_heap():
    assert _blocks_mapped_for("plain", 24) == 1  # by default a fresh mapping, its pages faulted in on first write
    assert _blocks_mapped_for("worker", 24) == 0  # in a worker, heap memory that earlier tensors freed
    assert _blocks_mapped_for("worker", 40) == 1  # above glibc's limit for the setting: mapped as before

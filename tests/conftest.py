"""Shared fixtures: a fixed pseudonym key (never the user's), quiet progress bars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "test-key-not-secret")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """The real DICOM files pydicom ships (CT, MR, NM, SEG, SR, RT, JPEG 2000, RLE, truncated...)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"

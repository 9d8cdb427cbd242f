"""Read one manifest sample (a single slice) whatever file holds it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from lung_effnet.errors import InputError
from lung_effnet.io.images2d import is_image_2d, read_image_2d
from lung_effnet.io.nifti import is_nifti, read_nifti
from lung_effnet.io.volume import Volume

HU, GRAY = "HU", "gray"
"""Units of a plane: CT numbers (to be windowed) or an already windowed grey level (to be scaled)."""


@lru_cache(maxsize=4)
def _cached_nifti(path: str) -> Volume:
    # Rows of one volume arrive together, so a tiny cache avoids re-reading it per slice.
    return read_nifti(path)


def read_dicom_file(path: str | Path) -> Volume:
    """One DICOM slice file as a one-slice canonical ``Volume`` (same rules as a whole series)."""
    from lung_effnet.io.dicom_index import SeriesIndex, classify_header, read_header
    from lung_effnet.io.dicom_series import load_series
    from lung_effnet.io.ledger import Ledger

    path = Path(path)
    try:
        ds, pixel_offset = read_header(path)
    except Exception as exc:  # no exception text: a parse error can quote an identifying tag's value
        raise InputError(f"unreadable DICOM header ({type(exc).__name__})") from None
    header, status, reason = classify_header(ds, path, path.name, pixel_offset)
    if header is None:
        raise InputError(f"{status}: {reason}")
    ledger = Ledger()
    volume = load_series(SeriesIndex(header.series_uid, [header]), ledger)
    if volume is None:
        raise InputError(next(iter(ledger.rows.values()))["reason"])
    return volume


def read_sample_plane(path: str | Path, slice_index: int | str | None = None) -> tuple[np.ndarray, str]:
    """The ``(H, W)`` float32 plane of one sample and its intensity scale (``"HU"`` or ``"gray"``).

    NIfTI volumes need ``slice_index`` (canonical order, z increasing superior); a DICOM file is one
    slice (its ``slice_index`` refers to the series and is not needed here); 2D images have none.

    Raises:
        ValueError / OSError: the file cannot be read or the slice does not exist.
    """
    path = str(path)
    if is_image_2d(path):
        return read_image_2d(path), GRAY
    if is_nifti(path):
        if slice_index in (None, ""):
            raise InputError("a NIfTI sample needs a slice_index")
        volume = _cached_nifti(path)
        k = int(slice_index)
        if not 0 <= k < volume.n_slices:
            raise InputError(f"slice_index {k} outside 0..{volume.n_slices - 1}")
        return volume.hu[k], HU
    return read_dicom_file(path).hu[0], HU

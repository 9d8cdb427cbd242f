"""Lesion masks: which values a mask file may hold, and the one rule that turns them into a lesion.

A mask is *binary* when its non-zero values are all 1 or all 255 (or it is boolean). Masks saved as
JPEG are not exactly binary (0 / 255 comes back as 0..4 and 250..255 around edges): an 8-bit mask
is *near-binary* when at least ``NEAR_BINARY_SHARE`` of its pixels lie within ``LOW_BAND`` or
``HIGH_BAND`` and some lie in ``HIGH_BAND``; it is used, thresholded at ``THRESHOLD``, with a
warning (once per process). Anything else (a label map 0 / 1 / 2 / 3, a grey image, NaN) is
refused: thresholding it would make a lesion where there is none. ``lesion`` is the rule ingest
checks against and training reads with, so both see the same lesion.

A palette (``P`` mode) PNG is read by its indices (``read_mask_image``), not by the luma of its
colours: a 0 / 1 palette mask stays 0 / 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lung_effnet.io.images2d import read_image_2d

log = logging.getLogger(__name__)

LOW_BAND = (0, 15)
HIGH_BAND = (240, 255)
NEAR_BINARY_SHARE = 0.99
THRESHOLD = 128
_warned: list[str] = []  # the first near-binary mask reported (one warning per process)


def read_mask_image(path: str | Path) -> np.ndarray:
    """A 2D mask file as ``(H, W)`` float32: palette PNGs by index, anything else as ``read_image_2d``."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode == "P":
            img.load()
            return np.asarray(img, dtype=np.float32)
    return read_image_2d(path)


def _exactly_binary(values: np.ndarray) -> bool:
    return bool(values.size == 0 or (values[0] in (1, 255) and (values == values[0]).all()))


def _near_binary(mask: np.ndarray) -> bool:
    if mask.size == 0 or not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 255:
        return False
    low = (mask >= LOW_BAND[0]) & (mask <= LOW_BAND[1])
    high = (mask >= HIGH_BAND[0]) & (mask <= HIGH_BAND[1])
    return bool(high.any() and (low | high).mean() >= NEAR_BINARY_SHARE)


def mask_values_problem(mask: np.ndarray, name: str = "") -> str | None:
    """Why ``mask`` cannot be used as a lesion mask (module docstring), or ``None``. A near-binary
    mask is accepted with one warning per process (``name``: the file, for that warning)."""
    mask = np.asarray(mask)
    if _exactly_binary(mask[mask != 0]):
        return None
    if _near_binary(mask):
        if not _warned:
            _warned.append(name)
            log.warning("lesion mask %s is not exactly binary (values between 0 and 255, as JPEG saves a 0/255 "
                        "mask): used thresholded at %d; further such masks are not reported", name or "(unnamed)",
                        THRESHOLD)
        return None
    values = mask[mask != 0]
    found = np.unique(values[:100_000])[:4]
    return f"not a binary mask: values other than 0 and 1 (or 0 and 255), e.g. {', '.join(f'{v:g}' for v in found)}"


def lesion(mask: np.ndarray, peak: float | None = None) -> np.ndarray:
    """The lesion of a mask as bool: ``mask > 0`` for 0 / 1 masks, ``mask >= THRESHOLD`` for 8-bit
    ones (0 / 255, exact or near-binary). The same for every reader of masks. ``peak``: the largest
    value of the whole mask file when ``mask`` is one slice of it (the rule is the file's)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    peak = float(mask.max(initial=0)) if peak is None else peak
    return mask >= THRESHOLD if peak > 1 else mask > 0

"""2D slices stored as PNG / JPG (the IQ-OTH/NCCD release): read as one grayscale plane."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_2d(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image_2d(path: str | Path) -> np.ndarray:
    """Read an image file as a ``(H, W)`` float32 grayscale plane with its stored values.

    8-bit files give 0..255 (already windowed, unlike HU), 16-bit PNG 0..65535. Colour files
    (many JPG slices are saved as RGB with three equal channels) are converted with ITU-R 601
    luma, which returns the grey value unchanged when the channels are equal.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return np.asarray(img, dtype=np.float32)
        return np.asarray(img.convert("L"), dtype=np.float32)

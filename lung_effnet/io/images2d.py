"""2D slices stored as PNG / JPG (the IQ-OTH/NCCD release): read as one grayscale plane."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lung_effnet.io.volume import check_finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAY_MAX_8BIT, GRAY_MAX_12BIT, GRAY_MAX_16BIT = 255.0, 4095.0, 65535.0


def gray_divisor(max_value: float) -> float | None:
    """What grey levels are divided by to reach the 8-bit scale (0..255) the model was trained on,
    decided from the image's largest value: ``None`` (as they are) up to 255; 4095 / 255 up to 4095
    (12-bit data, the usual CT export, often in a 16-bit PNG or TIFF); 65535 / 255 = 257 above.
    A 16-bit file whose values stay below 4096 is taken as 12-bit: divided by 257, such an image
    would reach the model at most 6% bright."""
    if max_value <= GRAY_MAX_8BIT:
        return None
    return (GRAY_MAX_12BIT if max_value <= GRAY_MAX_12BIT else GRAY_MAX_16BIT) / GRAY_MAX_8BIT


def is_image_2d(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image_2d(path: str | Path) -> np.ndarray:
    """Read an image file as a ``(H, W)`` float32 grayscale plane with its stored values.

    8-bit files give 0..255 (already windowed, unlike HU), 16-bit PNG 0..65535 (the preprocessing
    brings them to 0..255, see ``gray_divisor``). Colour files (many JPG slices are saved as RGB with
    three equal channels) are converted with ITU-R 601 luma, which returns the grey value unchanged
    when the channels are equal.

    Raises:
        NonFiniteValuesError: a floating-point image (TIFF) with a NaN or infinite value.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            plane = np.asarray(img, dtype=np.float32)
            if img.mode == "F":
                check_finite(plane)
            return plane
        return np.asarray(img.convert("L"), dtype=np.float32)

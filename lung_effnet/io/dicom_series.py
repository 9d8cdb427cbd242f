"""Decode one indexed DICOM series into a ``Volume`` in HU (the second pass after ``dicom_index``).

Pixel data of every transfer syntax pydicom can decode is read through its plugins: native,
deflated, big-endian, RLE, JPEG baseline/extended/lossless (pylibjpeg-libjpeg), JPEG-LS
(pylibjpeg-libjpeg / pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg). A slice that fails to decode
becomes a ``failed`` ledger row; the series is built from the rest and flagged.
"""

from __future__ import annotations

import numpy as np
from pydicom.pixels import pixel_array

from lung_effnet.errors import InputError
from lung_effnet.io.dicom_index import SeriesIndex, SliceHeader
from lung_effnet.io.ledger import Ledger
from lung_effnet.io.volume import NonFiniteValuesError, Volume, affine_from_lps, check_finite, spacing_of, to_canonical

GAP_FACTOR = 1.5
"""Neighbouring slices further apart than this many times the median spacing mark a gap."""


def read_stored_pixels(header: SliceHeader) -> np.ndarray:
    """The stored values of one slice, ``(Rows, Columns)`` in their stored integer type.

    Natively stored pixels are read straight from the offset the index found (no second header
    parse: this is what makes the two-pass reader as fast as one ``dcmread``); anything else,
    compressed syntaxes included, goes through pydicom's decoders and plugins.
    """
    layout = header.pixel
    if layout is not None:
        rows, cols = header.shape
        dtype = np.dtype(layout.dtype)
        with open(header.path, "rb") as fh:
            fh.seek(layout.offset)
            element = fh.read(layout.header_bytes)
            length = int.from_bytes(element[-4:], "little" if layout.dtype[0] == "<" else "big")
            tag_ok = element[:4] == (b"\xe0\x7f\x10\x00" if layout.dtype[0] == "<" else b"\x7f\xe0\x00\x10")
            if tag_ok and length >= rows * cols * dtype.itemsize:
                stored = np.fromfile(fh, dtype=dtype, count=rows * cols)
                if stored.size == rows * cols:
                    return stored.reshape(rows, cols)
            # Anything unexpected (odd element, truncated file): let pydicom decide and explain.
    return pixel_array(header.path)


INT16_RANGE = (-32768, 32767)


def exact_in_int16(headers: list[SliceHeader]) -> bool:
    """Whether HU can be stored exactly as int16: slope 1 and whole-number intercepts (CT's usual
    rescale). Half the memory of float32 and no page-faulting a float copy of the whole series."""
    return all(h.slope == 1.0 and float(h.intercept).is_integer() for h in headers)


def decode_slice_hu(header: SliceHeader, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one slice file to HU: ``(Rows, Columns)`` = stored * slope + intercept.

    pydicom already honours PixelRepresentation (signed / unsigned storage) and the signedness
    quirks of JPEG-LS / JPEG 2000 codestreams, so the rescale applies to correctly typed values.
    ``out`` (float32, or int16 when ``exact_in_int16``) is filled in place; an int16 ``out`` that
    cannot hold the values raises ``OverflowError`` (the caller then switches to float32). A slope or
    intercept that is NaN or infinite (``RescaleSlope "NaN"``) raises ``NonFiniteValuesError``.
    """
    stored = read_stored_pixels(header)
    if stored.shape != header.shape:
        raise InputError(f"decoded shape {stored.shape} differs from Rows x Columns {header.shape}")
    hu = np.empty(header.shape, np.float32) if out is None else out
    if hu.dtype == np.int16:
        shift = int(header.intercept)
        limits = np.iinfo(stored.dtype) if stored.dtype.kind in "iu" else None
        # Check the values only when the stored type's own range could leave int16's.
        if limits is None or limits.min + shift < INT16_RANGE[0] or limits.max + shift > INT16_RANGE[1]:
            if int(stored.min()) + shift < INT16_RANGE[0] or int(stored.max()) + shift > INT16_RANGE[1]:
                raise OverflowError("HU outside the int16 range")
        np.add(stored, shift, out=hu, casting="unsafe")
    elif header.slope != 1.0:
        np.multiply(stored, np.float32(header.slope), out=hu, casting="unsafe")
        hu += np.float32(header.intercept)
    else:  # the usual case: one pass, cast and shift together
        np.add(stored, np.float32(header.intercept), out=hu, casting="unsafe")
    check_finite(hu)  # int16 passes at once; float32 costs one pass over the slice
    return hu


def slice_spacing(positions: np.ndarray, thickness: float) -> tuple[float, list[str]]:
    """Distance between slice centres (median of neighbours, mm) and a warning per gap found."""
    if len(positions) < 2:
        return (thickness if thickness > 0 else 1.0), []
    steps = np.diff(positions)
    dz = float(np.median(steps))
    gaps = [
        f"gap in slice positions: {steps[i]:.2f} mm between slices {i} and {i + 1} (median {dz:.2f} mm)"
        for i in np.flatnonzero(steps > GAP_FACTOR * dz)
    ]
    return dz, gaps


def load_series(entry: SeriesIndex, ledger: Ledger) -> Volume | None:
    """Decode a series' slices, in index order, into a canonical-orientation ``Volume``.

    Returns ``None`` (every file marked failed) when no slice decodes.
    """
    if not entry.slices:
        return None
    rows, cols = entry.slices[0].shape
    dtype = np.int16 if exact_in_int16(entry.slices) else np.float32
    stack = np.empty((len(entry.slices), rows, cols), dtype)  # (Z, Y, X), filled in place
    good: list[SliceHeader] = []
    for header in entry.slices:
        try:
            try:
                decode_slice_hu(header, out=stack[len(good)])
            except OverflowError:  # rare: values beyond int16; continue in float32
                stack = stack.astype(np.float32)
                decode_slice_hu(header, out=stack[len(good)])
            good.append(header)
        except NonFiniteValuesError as exc:  # NaN slope or pixels: the slice fails, never a silent NaN
            ledger.failed(header.rel, "decode", str(exc), entry.series_uid)
        except Exception as exc:  # truncated, no pixel data, unsupported codec: one row, go on
            ledger.failed(header.rel, "decode", f"pixel data not decodable: {type(exc).__name__}: {exc}"[:300], entry.series_uid)
    if not good:
        return None
    stack = stack[: len(good)]
    warnings = [f"{len(entry.slices) - len(good)} slice(s) failed to decode"] if len(good) < len(entry.slices) else []
    if entry.dropped:
        warnings.append(f"{len(entry.dropped)} file(s) left out of the series at indexing")
    first = good[0]
    dz, gaps = slice_spacing(np.array([h.position for h in good]), first.thickness)
    warnings += gaps
    # Direction cosines are often written with a few digits: renormalise so spacing stays exact.
    row_dir = np.array(first.orientation[:3]) / np.linalg.norm(first.orientation[:3])
    col_dir = np.array(first.orientation[3:]) / np.linalg.norm(first.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    dy, dx = first.pixel_spacing
    affine = affine_from_lps(first.origin, row_dir, col_dir, normal / np.linalg.norm(normal), (dz, dy, dx))
    # Reorient the (X, Y, Z) view: a feet-first or prone series ends up in the same canonical
    # layout as a head-first supine one; for the usual orientation this copies nothing.
    hu, affine, transform = to_canonical(stack.transpose(2, 1, 0), affine)
    files = [h.rel for h in good]
    if transform[2, 1] < 0:  # the slice axis was reversed
        files.reverse()
    return Volume(hu=hu, spacing=spacing_of(affine), affine=affine, series_uid=entry.series_uid,
                  source_files=files, warnings=warnings)

"""The fast path for natively stored pixels gives exactly what pydicom decodes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.pixels import pixel_array

from lung_effnet.io.dicom_index import native_pixel_layout, read_header
from lung_effnet.io.dicom_series import read_stored_pixels


@pytest.mark.parametrize("name", [
    "CT_small.dcm",             # explicit VR little endian, signed
    "MR_small.dcm",             # explicit VR little endian
    "MR_small_implicit.dcm",    # implicit VR little endian
    "MR_small_bigendian.dcm",   # explicit VR big endian
    "MR_small_padded.dcm",
    "dicomdirtests/77654033/CT2/17106",
])
def test_native_layout_read_equals_pydicom(pydicom_test_files, name):
    path = pydicom_test_files / name
    ds, offset = read_header(path)
    layout = native_pixel_layout(ds, offset)
    assert layout is not None, "expected a native transfer syntax"
    header = SimpleNamespace(path=str(path), pixel=layout, shape=(int(ds.Rows), int(ds.Columns)))
    fast = read_stored_pixels(header)
    expected = pixel_array(str(path))
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm"])
def test_compressed_files_go_through_pydicom(pydicom_test_files, name):
    ds, offset = read_header(pydicom_test_files / name)
    assert native_pixel_layout(ds, offset) is None


def test_truncated_native_file_falls_back_to_pydicom_error(pydicom_test_files, tmp_path):
    data = (pydicom_test_files / "CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    ds, offset = read_header(cut)
    header = SimpleNamespace(path=str(cut), pixel=native_pixel_layout(ds, offset), shape=(128, 128))
    with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises on a cut file, not silence
        read_stored_pixels(header)


US_KEYWORDS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "HighBit"]


def test_raw_unsigned_shorts_equal_pydicoms_values(pydicom_test_files):
    """``unsigned_short`` reads US values from the raw bytes (both byte orders, implicit and
    explicit VR): the same numbers pydicom's conversion gives, on every file pydicom ships that
    has them, before and after pydicom has converted the element itself."""
    import pydicom

    from lung_effnet.io.dicom_index import unsigned_short

    checked = set()
    for path in sorted(pydicom_test_files.rglob("*")):
        try:
            ds, _ = read_header(path)
        except Exception:
            continue  # not DICOM, or truncated: the index reports those
        for keyword in US_KEYWORDS:
            raw = unsigned_short(ds, keyword, -1)
            reference = pydicom.dcmread(path, stop_before_pixels=True, force=True).get(keyword)
            expected = -1 if reference in (None, b"", "") else int(reference)
            assert raw == expected, (path.name, keyword)
            if keyword in ds:
                _ = ds[keyword].value  # pydicom converts the element...
            assert unsigned_short(ds, keyword, -1) == expected  # ...and the value read is the same
            if raw >= 0:
                checked.add((ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"))
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"} <= {str(u) for u in checked}

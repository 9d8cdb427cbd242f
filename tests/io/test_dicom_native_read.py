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

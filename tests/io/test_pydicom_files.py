"""Ingest of files written by others: the test files pydicom ships."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from lung_effnet.ingest.sources import ingest
from lung_effnet.io.dicom_index import list_files


@pytest.fixture(scope="module")
def ingested(pydicom_test_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest_pydicom")
    result = ingest(pydicom_test_files, out, progress=False)
    return pydicom_test_files, out, result


def test_every_file_has_one_ledger_row(ingested, read_csv):
    root, out, _ = ingested
    ledger = read_csv(out / "files.csv")
    assert len(ledger) == len(list_files(root))
    assert sorted(r["path"] for r in ledger) == sorted(p.relative_to(root).as_posix() for p in list_files(root))
    errors = read_csv(out / "errors.csv")
    assert {r["path"] for r in errors} == {r["path"] for r in ledger if r["status"] != "used"}
    assert all(r["reason"] and r["stage"] for r in errors)


def test_reads_the_ct_images(ingested, read_csv):
    root, out, _ = ingested
    status = {r["path"]: r for r in read_csv(out / "files.csv")}
    for name in ("CT_small.dcm", "693_J2KI.dcm"):  # explicit little endian and JPEG 2000
        assert status[name]["status"] == "used", status[name]
    series = {r["series_uid"]: r for r in read_csv(out / "series.csv")}
    for name in ("CT_small.dcm", "693_J2KI.dcm"):
        uid = str(pydicom.dcmread(root / name, stop_before_pixels=True).SeriesInstanceUID)
        assert series[uid]["n_slices"] == "1"  # a single-slice series is a valid 2D input
        assert series[uid]["status"] == "ok"


@pytest.mark.parametrize("name, words", [
    ("MR_small.dcm", "MR"), ("JPEG2000.dcm", "NM"), ("liver_1frame.dcm", "SEG"),
    ("test-SR.dcm", "SR"), ("rtplan.dcm", "RTPLAN"), ("rtstruct.dcm", "RTSTRUCT"),
    ("rtdose.dcm", "RTDOSE"), ("MR_truncated.dcm", "MR"), ("README.txt", "not a DICOM"),
    ("dicomdirtests/98892001/CT2N/6293", "localizer"), ("dicomdirtests/DICOMDIR", "DICOMDIR"),
])
def test_other_files_get_their_reason(ingested, name, words, read_csv):
    _, out, _ = ingested
    row = {r["path"]: r for r in read_csv(out / "files.csv")}[name]
    assert row["status"] == "skipped"
    assert words in row["reason"]


def test_ct_without_pixel_geometry_fails_with_reason(ingested, read_csv):
    _, out, _ = ingested
    rows = [r for r in read_csv(out / "files.csv") if r["path"].startswith("dicomdirtests/TINY_ALPHA/PT")]
    assert rows and all(r["status"] == "failed" and "geometry" in r["reason"] for r in rows)


def test_hu_match_pydicom_rescale(pydicom_test_files):
    from lung_effnet.io.planes import read_dicom_file

    path = pydicom_test_files / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    expected = apply_rescale(ds.pixel_array, ds).astype(np.float32)
    volume = read_dicom_file(path)
    np.testing.assert_array_equal(volume.hu[0], expected)  # standard orientation: no flip
    assert volume.spacing[1:] == pytest.approx([float(v) for v in ds.PixelSpacing])


def test_gap_in_positions_is_flagged(ingested, read_csv):
    """The CT2 series in pydicom's dicomdirtests has a 202 mm jump between its slices."""
    _, out, _ = ingested
    rows = [r for r in read_csv(out / "series.csv") if "gap" in r["warnings"]]
    assert rows and rows[0]["status"] == "incomplete"

"""DICOM series reading on phantom series written with every option a reader must survive."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from lung_effnet.ingest.sources import ingest
from lung_effnet.io.dicom_index import index_dicom_tree
from lung_effnet.io.dicom_series import load_series
from lung_effnet.io.ledger import Ledger
from lung_effnet.io.volume import canonical_affine
from lung_effnet.synthetic.dicom_writer import write_dicom_series, write_localizer, write_sr
from lung_effnet.synthetic.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom("malignant", np.random.default_rng(3), size_px=48, n_slices=8)


def _write(phantom, folder, seed=0, **kw):
    return write_dicom_series(phantom.hu, phantom.spacing, folder, patient_id="PID-1", patient_name="SYN^ONE",
                              rng=np.random.default_rng(seed), **kw)


def _read_one(folder):
    ledger = Ledger()
    series = index_dicom_tree(folder, ledger, progress=False)
    assert len(series) == 1
    return load_series(next(iter(series.values())), ledger), ledger


@pytest.mark.parametrize("order", ["shuffled", "missing"])
def test_order_comes_from_positions_not_instance_numbers(phantom, tmp_path, order):
    _write(phantom, tmp_path, shuffle_instance_number=order == "shuffled", omit_instance_number=order == "missing")
    volume, _ = _read_one(tmp_path)
    np.testing.assert_array_equal(volume.hu, np.rint(phantom.hu))


@pytest.mark.parametrize("storage", ["signed", "unsigned"])
@pytest.mark.parametrize("compression", [None, "jpeg2000", "jpegls", "rle"])
def test_hu_for_each_storage_and_transfer_syntax(phantom, tmp_path, storage, compression):
    files = _write(phantom, tmp_path, storage=storage, compression=compression)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.PixelRepresentation == (1 if storage == "signed" else 0)
    volume, ledger = _read_one(tmp_path)
    assert ledger.counts()["used"] == len(files)
    np.testing.assert_array_equal(volume.hu, np.rint(phantom.hu))
    np.testing.assert_allclose(volume.spacing, phantom.spacing, rtol=1e-5)


def test_feet_first_prone_orientation_reads_canonical(phantom, tmp_path):
    """Rows and columns reversed (IOP -1,0,0 / 0,-1,0): same anatomy, same canonical volume."""
    files = _write(phantom, tmp_path, shuffle_names=False)
    dz, dy, dx = phantom.spacing
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        far_corner = ipp + (pixels.shape[1] - 1) * dx * np.array([1, 0, 0]) + (pixels.shape[0] - 1) * dy * np.array([0, 1, 0])
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [float(v) for v in far_corner]
        ds.PixelData = np.ascontiguousarray(pixels[::-1, ::-1]).tobytes()
        ds.save_as(path)
    volume, _ = _read_one(tmp_path)
    np.testing.assert_array_equal(volume.hu, np.rint(phantom.hu))
    origin = [float(v) for v in pydicom.dcmread(files[0]).ImagePositionPatient]
    expected_origin_lps = np.array(origin) - np.array([(phantom.hu.shape[2] - 1) * dx, (phantom.hu.shape[1] - 1) * dy, 0])
    np.testing.assert_allclose(volume.affine, canonical_affine(phantom.spacing, expected_origin_lps), atol=1e-4)


def test_truncated_slice_is_an_error_row_and_the_series_is_flagged(phantom, tmp_path):
    files = _write(phantom, tmp_path, shuffle_names=False)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])
    volume, ledger = _read_one(tmp_path)
    assert volume.n_slices == len(files) - 1
    assert any("failed to decode" in w for w in volume.warnings)
    bad = ledger.rows[files[3].name]
    assert bad["status"] == "failed" and ledger.stages[files[3].name] == "decode"


def test_folder_with_two_series_an_sr_and_a_localizer(phantom, tmp_path):
    other = make_phantom("normal", np.random.default_rng(4), size_px=48, n_slices=6)
    a = _write(phantom, tmp_path, seed=1)
    b = write_dicom_series(other.hu, other.spacing, tmp_path, patient_id="PID-2", patient_name="SYN^TWO", rng=np.random.default_rng(2))
    study = str(pydicom.dcmread(a[0]).StudyInstanceUID)
    sr = write_sr(tmp_path, patient_id="PID-1", patient_name="SYN^ONE", rng=np.random.default_rng(5), study_uid=study)
    loc = write_localizer(phantom.hu, phantom.spacing, tmp_path, patient_id="PID-1", patient_name="SYN^ONE",
                          rng=np.random.default_rng(6), study_uid=study)
    ledger = Ledger()
    series = index_dicom_tree(tmp_path, ledger, progress=False)
    assert sorted(len(s.slices) for s in series.values()) == [6, 8]
    assert ledger.rows[sr.name]["status"] == "skipped" and "SR" in ledger.rows[sr.name]["reason"]
    assert ledger.rows[loc.name]["status"] == "skipped" and "localizer" in ledger.rows[loc.name]["reason"]
    assert len(ledger.rows) == len(a) + len(b) + 2


def test_header_pass_in_worker_processes_gives_the_serial_result(phantom, tmp_path):
    """Scoring reads headers with a process pool's map: same series, same slice order, same rows."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    _write(phantom, tmp_path / "a", seed=1)
    files = _write(phantom, tmp_path / "b", seed=2)
    files[2].write_bytes(files[2].read_bytes()[:1200])  # a header cut short: a failed row
    (tmp_path / "b" / "notes.txt").write_text("not DICOM")
    write_sr(tmp_path / "b", patient_id="PID-1", patient_name="SYN^ONE", rng=np.random.default_rng(5),
             study_uid=str(pydicom.dcmread(files[0]).StudyInstanceUID))
    serial_ledger, pooled_ledger = Ledger(), Ledger()
    serial = index_dicom_tree(tmp_path, serial_ledger, progress=False)
    with ProcessPoolExecutor(2) as pool:
        pooled = index_dicom_tree(tmp_path, pooled_ledger, progress=False, map_fn=partial(pool.map, chunksize=3))
    assert list(pooled) == list(serial) and len(serial) == 2
    for uid in serial:
        assert pooled[uid].slices == serial[uid].slices
    assert pooled_ledger.rows == serial_ledger.rows and pooled_ledger.stages == serial_ledger.stages
    assert {r["status"] for r in serial_ledger.rows.values()} == {"used", "skipped", "failed"}


def test_a_series_spanning_two_folders_is_one_series(phantom, tmp_path):
    files = _write(phantom, tmp_path / "a", shuffle_names=False)
    (tmp_path / "b").mkdir()
    for path in files[::2]:
        shutil.move(path, tmp_path / "b" / path.name)
    volume, _ = _read_one(tmp_path)
    np.testing.assert_array_equal(volume.hu, np.rint(phantom.hu))


def test_ingest_nifti_lands_where_the_dicom_geometry_says(phantom, tmp_path):
    from monai.transforms import LoadImage

    origin = (-100.0, -80.0, 55.0)
    files = _write(phantom, tmp_path / "src", origin_lps=origin)
    result = ingest(tmp_path / "src", tmp_path / "out", write_nifti=True, progress=False)
    (row,) = result.series
    path = tmp_path / "out" / row["nifti_path"]
    img = nib.load(str(path))
    # A voxel's world position (RAS) from the DICOM tags of the file that holds it.
    ds = pydicom.dcmread(files[5])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    row_i, col_j = 7, 11
    lps = ipp + col_j * float(ds.PixelSpacing[1]) * np.array([1, 0, 0]) + row_i * float(ds.PixelSpacing[0]) * np.array([0, 1, 0])
    expected_ras = lps * np.array([-1, -1, 1])
    k = int(round((ipp[2] - origin[2]) / phantom.spacing[0]))
    np.testing.assert_allclose(nib.affines.apply_affine(img.affine, [col_j, row_i, k]), expected_ras, atol=1e-3)
    stored = ds.pixel_array[row_i, col_j] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.asarray(img.dataobj)[col_j, row_i, k] == stored
    loaded = LoadImage(image_only=True)(str(path))
    np.testing.assert_allclose(np.asarray(loaded.affine), img.affine, atol=1e-5)
    assert float(loaded[col_j, row_i, k]) == stored


def test_labels_keyed_by_patient_study_or_series(phantom, tmp_path, read_csv):
    files = _write(phantom, tmp_path / "src")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    for key, value in (("patient_id", "PID-1"), ("study_id", ds.StudyInstanceUID), ("series_uid", ds.SeriesInstanceUID)):
        labels = tmp_path / f"labels_{key}.csv"
        labels.write_text(f"{key},label\n{value},Malignant\n")
        result = ingest(tmp_path / "src", tmp_path / f"out_{key}", labels_csv=labels, progress=False)
        rows = read_csv(tmp_path / f"out_{key}" / "manifest.csv")
        assert len(rows) == phantom.hu.shape[0] and {r["label"] for r in rows} == {"malignant"}
        assert sorted(int(r["slice_index"]) for r in rows) == list(range(phantom.hu.shape[0]))
        assert all(r["patient_id"].startswith("P-") for r in rows)
        assert not result.warnings


def test_unlabelled_series_are_skipped_not_lost(phantom, tmp_path, read_csv):
    files = _write(phantom, tmp_path / "src")
    labels = tmp_path / "labels.csv"
    labels.write_text("series_uid,label\n1.2.3.4,benign\n")
    result = ingest(tmp_path / "src", tmp_path / "out", labels_csv=labels, progress=False)
    ledger = read_csv(tmp_path / "out" / "files.csv")
    assert len(ledger) == len(files) and all(r["status"] == "skipped" for r in ledger)
    assert "no label" in ledger[0]["reason"]
    assert any("matched no series" in w for w in result.warnings)

"""Inputs that must never give a silent result: NaN pixels, 12-bit grey in 16-bit files, file names
that collide, are too long or are not UTF-8, symlink loops, folders that cannot be read."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lung_effnet.config import DataConfig
from lung_effnet.io.dicom_index import index_dicom_tree, record_walk_problems, walk_files
from lung_effnet.io.dicom_series import load_series
from lung_effnet.io.images2d import gray_divisor, read_image_2d
from lung_effnet.io.ledger import Ledger
from lung_effnet.io.names import STEM_CHARS, safe_file_name
from lung_effnet.io.nifti import read_nifti
from lung_effnet.io.volume import NON_FINITE, NonFiniteValuesError, canonical_affine, write_nifti
from lung_effnet.preprocess.volume import preprocess_volume
from lung_effnet.synthetic.dataset import write_synthetic_dataset


def set_rescale_slope(path: Path, value: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is no valid DS, which is the point
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = value
        ds.save_as(path)


@pytest.fixture
def series_dir(tmp_path) -> Path:
    data = write_synthetic_dataset(tmp_path / "d", "dicom", n_patients=1, seed=0, size_px=32, n_slices=4, progress=False)
    return data / "P0001"


def _load(folder: Path):
    ledger = Ledger()
    (entry,) = index_dicom_tree(folder, ledger, progress=False).values()
    return load_series(entry, ledger), ledger


def test_a_nan_rescale_slope_fails_the_series_instead_of_scoring_nan(series_dir):
    for f in series_dir.glob("*.dcm"):
        set_rescale_slope(f, "NaN")
    volume, ledger = _load(series_dir)
    assert volume is None  # no slice left: the series fails (it used to be all-NaN, scored "benign")
    assert {r["status"] for r in ledger.rows.values()} == {"failed"}
    assert all(NON_FINITE in r["reason"] for r in ledger.rows.values())


def test_one_nan_slice_is_a_failed_file_and_the_series_is_incomplete(series_dir):
    bad = sorted(series_dir.glob("*.dcm"))[1]
    set_rescale_slope(bad, "NaN")
    volume, ledger = _load(series_dir)
    assert volume is not None and volume.n_slices == 3 and np.isfinite(volume.hu).all()
    assert volume.warnings and "failed to decode" in volume.warnings[0]
    row = ledger.rows[bad.relative_to(series_dir).as_posix()]
    assert row["status"] == "failed" and NON_FINITE in row["reason"] and ledger.stages[row["path"]] == "decode"


def test_a_nifti_with_nan_voxels_is_refused(tmp_path):
    hu = np.full((3, 8, 8), -1000.0, np.float32)
    hu[1, 2, 2] = np.nan
    path = write_nifti(tmp_path / "v.nii.gz", hu, canonical_affine((1.0, 1.0, 1.0)), dtype=np.float32)
    with pytest.raises(NonFiniteValuesError, match=r"NaN/inf\) in 1 of 192"):
        read_nifti(path)


def test_a_float_tiff_with_nan_is_refused(tmp_path):
    plane = np.ones((8, 8), np.float32)
    plane[0, 0] = np.inf
    Image.fromarray(plane, mode="F").save(tmp_path / "x.tif")
    with pytest.raises(NonFiniteValuesError):
        read_image_2d(tmp_path / "x.tif")


def test_12_bit_values_in_a_16_bit_png_reach_the_model_in_full_range(tmp_path):
    """A 12-bit export (0..4095 in a 16-bit PNG) was divided by 257: at most 0.06 reached the model."""
    yy, xx = np.mgrid[:64, :64]
    plane = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2, (xx * 64) % 4096, 0).astype(np.uint16)
    plane[32, 32] = 4095
    Image.fromarray(plane).save(tmp_path / "ct12.png")  # PIL writes uint16 as a 16-bit grey PNG
    stored = read_image_2d(tmp_path / "ct12.png")
    assert stored.max() == 4095
    x = preprocess_volume(stored[None], "gray", DataConfig(image_size=32, context_slices=0, crop="none"))
    assert x.max() > 0.8 and x.min() >= 0.0  # scaled by 4095 (by 65535 it was 0.06 at most)
    assert gray_divisor(255) is None and gray_divisor(4095) == pytest.approx(4095 / 255) and gray_divisor(4096) == 257.0


def test_made_up_file_names_never_collide_and_stay_short():
    names = {safe_file_name(k, ".html") for k in ("a/b.jpg", "a_b.jpg", "a b.jpg", "A/b.jpg")}
    assert len(names) == 4 and all(n.startswith(("a_b.jpg-", "A_b.jpg-")) for n in names)
    long = "/".join(["folder-with-a-long-name-" + str(i) for i in range(20)]) + "/slice.png"
    assert len(long) > 250 and len(safe_file_name(long, ".nii.gz")) <= STEM_CHARS + 20
    assert safe_file_name(long) != safe_file_name(long.replace("-1/", "-x/"))  # differ only in the part left out
    assert safe_file_name(long, ".html").endswith(".html") and "_slice.png-" in safe_file_name(long, ".html")


def test_the_walk_reports_symlink_loops_broken_links_and_undecodable_names(tmp_path):
    (tmp_path / "ok.dcm").write_bytes(b"x")
    os.symlink("loop.dcm", tmp_path / "loop.dcm")
    os.symlink("missing.dcm", tmp_path / "dangling.dcm")
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "linked")
    bad_name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1 bytes: no UTF-8 name
    (tmp_path / bad_name).write_bytes(b"x")
    files, problems = walk_files(tmp_path)
    assert files == [tmp_path / "ok.dcm"]
    ledger = Ledger()
    record_walk_problems(problems, tmp_path, ledger)
    reasons = {p: (r["status"], ledger.stages[p], r["reason"]) for p, r in ledger.rows.items()}
    assert reasons["loop.dcm"] == ("failed", "walk", "symlink loop")
    assert reasons["dangling.dcm"][2].startswith("broken symlink")
    assert reasons["linked/"][0] == "skipped" and "symlinked folder" in reasons["linked/"][2]
    assert reasons[bad_name][2].startswith("file name is not valid UTF-8")  # keyed by the name as found
    files_csv, _ = ledger.write(tmp_path / "out")  # written with the undecodable byte escaped, as UTF-8
    assert "caf\\xe9.dcm,,failed,file name is not valid UTF-8" in files_csv.read_text(encoding="utf-8")


def test_the_walk_reports_a_folder_it_cannot_read(tmp_path, locked_folders):
    """The real thing needs a process without root's permission bypass (tests/ingest, tests/scoring);
    here os.walk is told the folder cannot be listed, as it is then."""
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "a.dcm").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    files, problems = walk_files(tmp_path)
    assert files == [tmp_path / "open" / "a.dcm"]
    ledger = Ledger()
    record_walk_problems(problems, tmp_path, ledger)
    assert ledger.rows["locked/"]["reason"] == "folder not readable: Permission denied"
    assert ledger.error_rows() == [{"path": "locked/", "stage": "walk", "reason": "folder not readable: Permission denied"}]

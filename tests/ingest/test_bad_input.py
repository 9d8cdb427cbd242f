"""Ingest of inputs that used to pass silently or crash: NaN pixels, colliding and long series names,
undecodable file names, symlink loops, unreadable folders, an unwritable --out, a UTF-16 manifest,
and sources with nothing usable (exit codes)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lung_effnet.cli import main
from lung_effnet.io.volume import NON_FINITE, canonical_affine, write_nifti
from lung_effnet.synthetic.dataset import write_synthetic_dataset

LONG = ["x" * 90, "y" * 90, "z" * 90]  # a relative path of ~290 characters, each part a valid name


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    data = write_synthetic_dataset(tmp_path_factory.mktemp("nifti"), "nifti", n_patients=1, seed=0, size_px=32,
                                   n_slices=3, progress=False)
    return data / "P0001" / "ct.nii.gz"


def _nan_volume(path: Path) -> Path:
    hu = np.full((3, 16, 16), -1000.0, np.float32)
    hu[1] = np.nan
    return write_nifti(path, hu, canonical_affine((1.0, 1.0, 1.0)), dtype=np.float32)


def _cli(args, capsys) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_files_become_rows_and_series_names_stay_unique_and_short(volume_file, tmp_path, capsys, read_csv):
    root = tmp_path / "in"
    for rel in ("a/b.nii.gz", "a_b.nii.gz", "/".join(LONG) + "/ct.nii.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(volume_file, root / rel)
    _nan_volume(root / "nan.nii.gz")
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not read")
    os.symlink("loop.dcm", root / "loop.dcm")
    out = tmp_path / "out"
    code, err = _cli(["ingest", "-q", str(root), "--out", str(out), "--nifti"], capsys)
    assert code == 0, err
    series = {r["series_uid"]: r for r in read_csv(out / "series.csv")}
    assert series["nan.nii.gz"]["status"] == "failed"
    written = [r["nifti_path"] for r in series.values() if r["nifti_path"]]
    assert len(written) == 3 and len(set(written)) == 3  # a/b and a_b used to share one file
    assert all(len(Path(w).name) < 120 and (out / w).is_file() for w in written)  # the long path used to crash
    errors = {r["path"]: (r["stage"], r["reason"]) for r in read_csv(out / "errors.csv")}  # read as UTF-8
    assert NON_FINITE in errors["nan.nii.gz"][1]
    assert errors["caf\\xe9.png"] == ("walk", "file name is not valid UTF-8: rename it to use it")
    assert errors["loop.dcm"] == ("walk", "symlink loop")
    assert len(read_csv(out / "files.csv")) == 6


def test_a_nan_slice_never_reaches_the_manifest(tmp_path, capsys, read_csv):
    data = write_synthetic_dataset(tmp_path / "d", "dicom", n_patients=1, seed=0, size_px=32, n_slices=4, progress=False)
    bad = sorted((data / "P0001").glob("*.dcm"))[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(bad)
        ds.RescaleSlope = "NaN"
        ds.save_as(bad)
    out = tmp_path / "out"
    code, err = _cli(["ingest", "-q", str(data), "--out", str(out), "--labels", str(data / "labels.csv")], capsys)
    assert code == 0, err
    manifest = read_csv(out / "manifest.csv")
    assert len(manifest) == 3 and bad.name not in {Path(r["path"]).name for r in manifest}
    assert [r["slice_index"] for r in manifest] == ["0", "1", "2"]
    errors = {r["path"]: r["reason"] for r in read_csv(out / "errors.csv")}
    assert NON_FINITE in errors[f"P0001/{bad.name}"]
    (series,) = read_csv(out / "series.csv")
    assert series["status"] == "incomplete" and series["n_failed"] == "1"


def test_nothing_usable_is_exit_3_after_the_outputs_and_an_empty_source_exit_2(tmp_path, capsys):
    _nan_volume(tmp_path / "in" / "nan.nii.gz")
    code, err = _cli(["ingest", "-q", str(tmp_path / "in"), "--out", str(tmp_path / "out")], capsys)
    assert code == 3 and len(err) == 1 and "errors.csv" in err[0], err
    assert all((tmp_path / "out" / n).is_file() for n in ("files.csv", "errors.csv", "series.csv", "ingest.json"))
    (tmp_path / "empty").mkdir()
    code, err = _cli(["ingest", "-q", str(tmp_path / "empty"), "--out", str(tmp_path / "out2")], capsys)
    assert code == 2 and len(err) == 1 and "no files found" in err[0], err


def test_a_utf16_manifest_is_one_line_naming_the_file(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id\na.png,benign,p1\n", encoding="utf-16")
    code, err = _cli(["ingest", "-q", str(manifest), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "manifest.csv" in err[0] and "not UTF-8" in err[0] and "UTF-16" in err[0]
    manifest.write_bytes("path,label,patient_id\nn\xe9.png,benign,p1\n".encode("latin-1"))
    code, err = _cli(["ingest", "-q", str(manifest), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "not UTF-8" in err[0] and "0xe9" in err[0], err


def test_an_unreadable_folder_is_an_error_row(volume_file, unprivileged, read_csv):
    run, base = unprivileged
    root = base / "in"
    (root / "open").mkdir(parents=True)
    shutil.copy(volume_file, root / "open" / "ct.nii.gz")
    (root / "locked").mkdir()
    shutil.copy(volume_file, root / "locked" / "ct.nii.gz")
    (root / "locked").chmod(0)
    try:
        done = run(["ingest", "-q", root, "--out", base / "out"])
    finally:
        (root / "locked").chmod(0o755)
    assert done.returncode == 0, done.stderr
    errors = read_csv(base / "out" / "errors.csv")
    assert errors == [{"path": "locked/", "stage": "walk", "reason": "folder not readable: Permission denied"}]
    assert len(read_csv(base / "out" / "files.csv")) == 2


def test_an_unwritable_out_stops_before_reading_the_source(volume_file, unprivileged):
    run, base = unprivileged
    (base / "in").mkdir()
    shutil.copy(volume_file, base / "in" / "ct.nii.gz")
    (base / "ro").mkdir()
    (base / "ro").chmod(0o555)
    done = run(["ingest", "-q", base / "in", "--out", base / "ro" / "out"])
    (base / "ro").chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert "--out: cannot write to" in err[0] and "Permission denied" in err[0]

"""Outputs that may leave the hospital: Study / Series Instance UIDs replaced by keyed pseudonyms
(``--pseudonymize-uids KEYFILE``, for ``score`` and ``ingest``), and CSV cells that a spreadsheet
would run as formulas (file names starting with ``=``, ``@``...) quoted, in every CSV, reading back
as written."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lung_effnet.cli import main
from lung_effnet.io.ledger import read_csv_rows
from lung_effnet.synthetic.dataset import write_synthetic_dataset

KEY = "0123456789abcdef-a-test-key-not-secret"
OTHER_KEY = "fedcba9876543210-another-test-key"
FORMULA_NAMES = ("=1+1.jpg", "@SUM(A1).png")
PSEUDONYM = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """A 2-fold b0 ensemble at 32 px (untrained; BatchNorm statistics from noise), as ``train`` saves it."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two DICOM series with a localizer and an SR (their own UIDs), two images whose names a
    spreadsheet would run, at the top of the input. Returns ``(root, labels.csv, every UID in the files)``."""
    tmp = tmp_path_factory.mktemp("uid-sources")
    data = write_synthetic_dataset(tmp / "dicom", "dicom", n_patients=2, seed=5, size_px=32, n_slices=4, extras=True,
                                   progress=False)
    root = tmp / "in"
    shutil.copytree(data, root, ignore=shutil.ignore_patterns("labels.csv", "masks", "synthetic.json"))
    rng = np.random.default_rng(0)
    for name in FORMULA_NAMES:
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / name)
    uids = set()
    for path in root.rglob("*"):
        if path.is_file() and path.suffix not in (".jpg", ".png"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
    assert len(uids) >= 5  # 2 studies, 2 CT series, a localizer and an SR series at least
    return root, data / "labels.csv", uids


def _run(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue() + err.getvalue()


def _key_file(tmp_path: Path, text: str, name: str = "uid.key") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    return path


def _texts(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (resume records and reports included), and every file name."""
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else b"" for p in out.rglob("*")}


def _assert_no_uid(out: Path, uids: set[str], key: str) -> None:
    for name, data in _texts(out).items():
        for uid in uids:
            assert uid.encode() not in data and uid not in name, (name, uid)
        assert key.encode() not in data, name


def _score(model_dir, root, out, *extra) -> tuple[int, str]:
    return _run(["score", "-q", "--model", str(model_dir), "--input", str(root), "--out", str(out), "--workers", "0",
                 "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def pseudonymized_run(model_dir, archive, tmp_path_factory):
    """``score --saliency --pseudonymize-uids KEYFILE`` on the archive: ``(out, key file, summary)``."""
    root, _, _ = archive
    tmp = tmp_path_factory.mktemp("pseudonymized")
    key = _key_file(tmp, KEY)
    code, printed = _score(model_dir, root, tmp / "out", "--saliency", "--pseudonymize-uids", str(key))
    assert code == 0, printed
    return tmp / "out", key, json.loads((tmp / "out" / "summary.json").read_text())


def test_score_with_pseudonymized_uids_writes_no_uid(pseudonymized_run, archive):
    out, _, summary = pseudonymized_run
    _assert_no_uid(out, archive[2], KEY)  # CSVs, summary.json, resume records (parts/), saliency pages and names
    rows = read_csv_rows(out / "predictions.csv")
    dicom = [r for r in rows if r["kind"] == "dicom"]
    assert len(dicom) == 2 and all(PSEUDONYM.match(r["series_uid"]) and len(r["series_uid"]) <= 64 for r in dicom)
    assert all((out / r["report"]).is_file() for r in dicom)  # pages named by pseudonym
    files = read_csv_rows(out / "files.csv")
    assert {r["series_uid"] for r in files if r["status"] == "used" and r["path"] not in FORMULA_NAMES} == \
        {r["series_uid"] for r in dicom}
    skipped = [r for r in files if r["status"] == "skipped" and r["series_uid"]]
    assert skipped and all(PSEUDONYM.match(r["series_uid"]) for r in skipped)  # localizer and SR series too
    assert summary["uids"]["key_fingerprint"] and summary["counts"]["series_scored"] == 4


def test_a_pseudonymized_run_resumes_and_refuses_another_key(pseudonymized_run, model_dir, archive, tmp_path):
    """Resume records are keyed by pseudonym: the same command again takes every unit from them and
    writes the same files; the folder is refused without the option or with another key."""
    out, key, summary = pseudonymized_run
    root, _, uids = archive
    before = {n: (out / n).read_bytes() for n in ("predictions.csv", "slice_scores.csv", "files.csv", "errors.csv")}
    code, printed = _score(model_dir, root, out, "--saliency", "--pseudonymize-uids", str(key))
    assert code == 0, printed
    again = json.loads((out / "summary.json").read_text())["run"]
    assert again["units_scored"] == 0 and again["units_resumed"] == summary["run"]["units_scored"]
    assert {n: (out / n).read_bytes() for n in before} == before
    _assert_no_uid(out, uids, KEY)
    for extra in ([], ["--pseudonymize-uids", str(_key_file(tmp_path, OTHER_KEY, "other.key"))]):
        code, printed = _score(model_dir, root, out, "--saliency", *extra)
        assert code == 2 and "uid_key" in printed, printed


def test_pseudonyms_are_stable_for_one_key(pseudonymized_run, model_dir, archive, tmp_path):
    """Another run into another folder with the same key gives the same pseudonyms (runs can be joined)."""
    out, key, _ = pseudonymized_run
    code, printed = _score(model_dir, archive[0], tmp_path / "b", "--pseudonymize-uids", str(key))
    assert code == 0, printed
    for name in ("predictions.csv", "files.csv"):
        first = [(r["path"], r["series_uid"]) for r in read_csv_rows(out / name)]
        assert [(r["path"], r["series_uid"]) for r in read_csv_rows(tmp_path / "b" / name)] == first


def test_csv_cells_a_spreadsheet_would_run_are_quoted_and_read_back(pseudonymized_run):
    """``=1+1.jpg`` and ``@SUM(A1).png`` at the top of the input: every CSV cell holding them starts
    with ``'``; numbers (probabilities, slice indices) are written as they are; the package's reader
    gives the names back. (A resumed run writes the same bytes, quoted once: test above.)"""
    out, _, _ = pseudonymized_run
    for name in ("predictions.csv", "slice_scores.csv", "files.csv"):
        text = (out / name).read_text()
        for bad in FORMULA_NAMES:
            assert f"\n'{bad}," in text and f"\n{bad}," not in text and f",{bad}," not in text, (name, text)
    rows = {r["path"]: r for r in read_csv_rows(out / "predictions.csv")}
    assert set(FORMULA_NAMES) <= set(rows)
    assert rows["=1+1.jpg"]["series_uid"] == "=1+1.jpg" and float(rows["=1+1.jpg"]["p_benign"]) >= 0


def test_ingest_with_pseudonymized_uids_writes_no_uid(archive, tmp_path):
    root, labels, uids = archive
    key = _key_file(tmp_path, KEY)
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        code, printed = _run(["ingest", "-q", str(root), "--out", str(out), "--labels", str(labels), "--nifti",
                              "--pseudonymize-uids", str(key)])
        assert code == 0, printed
        _assert_no_uid(out, uids, KEY)
        outs.append(out)
    manifest = read_csv_rows(outs[0] / "manifest.csv")
    assert manifest and all(PSEUDONYM.match(r["series_uid"]) and PSEUDONYM.match(r["study_id"]) for r in manifest)
    series = read_csv_rows(outs[0] / "series.csv")
    assert [r for r in series if r["nifti_path"]] and all((outs[0] / r["nifti_path"]).is_file() for r in series if r["nifti_path"])
    for name in ("manifest.csv", "series.csv", "files.csv", "errors.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()  # stable for one key
    files = {r["path"]: r for r in read_csv_rows(outs[0] / "files.csv")}
    assert set(FORMULA_NAMES) <= set(files)
    assert "\n'=1+1.jpg," in (outs[0] / "files.csv").read_text()


def test_ingest_without_the_option_keeps_uids(archive, tmp_path):
    """UIDs are written as found unless asked (the README says so): they link results to the archive."""
    root, labels, uids = archive
    code, printed = _run(["ingest", "-q", str(root), "--out", str(tmp_path / "o"), "--labels", str(labels)])
    assert code == 0, printed
    assert {r["series_uid"] for r in read_csv_rows(tmp_path / "o" / "manifest.csv")} <= uids


@pytest.mark.parametrize("command", ["ingest", "score"])
@pytest.mark.parametrize("key_text, words", [
    (None, ["--pseudonymize-uids: key file not found", "nowhere.key"]),
    ("short", ["--pseudonymize-uids", "5 characters", "at least 16"]),
    ("", ["--pseudonymize-uids:", "is a folder, not a key file"]),
])
def test_a_bad_key_file_is_one_line_that_never_quotes_the_key(model_dir, archive, tmp_path, command, key_text, words):
    root, labels, _ = archive
    key = tmp_path / "nowhere.key" if key_text is None else _key_file(tmp_path, key_text, "nowhere.key")
    if key_text == "":  # a folder where the key file should be
        key.unlink()
        key.mkdir()
    args = (["ingest", str(root), "--labels", str(labels)] if command == "ingest" else
            ["score", "--model", str(model_dir), "--input", str(root), "--workers", "0"])
    code, printed = _run([*args, "--out", str(tmp_path / "o"), "--pseudonymize-uids", str(key)])
    lines = printed.strip().splitlines()
    assert code == 2 and len(lines) == 1, printed
    assert all(w in lines[0] for w in words), lines[0]
    assert not key_text or key_text not in lines[0]


ODD_SERIES_UID = "1.2.840.99999.7.x42"  # not UID-shaped, yet found as a Series Instance UID in real archives
ODD_STUDY_UID = "1.2.840.99999.8.y7"


@pytest.fixture(scope="module")
def odd_uid_archive(tmp_path_factory):
    """One DICOM series whose Series and Study Instance UIDs are not shaped like UIDs (rewritten with
    pydicom in every file): ``(root, labels.csv)``."""
    tmp = tmp_path_factory.mktemp("odd-uid")
    data = write_synthetic_dataset(tmp / "dicom", "dicom", n_patients=1, seed=7, size_px=32, n_slices=4,
                                   progress=False)
    root = tmp / "in"
    shutil.copytree(data, root, ignore=shutil.ignore_patterns("labels.csv", "masks", "synthetic.json"))
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    old = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files}
    with pydicom.config.disable_value_validation():
        for path in files:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.StudyInstanceUID = ODD_SERIES_UID, ODD_STUDY_UID
            ds.save_as(path)
    labels = (data / "labels.csv").read_text()
    for uid in old:
        labels = labels.replace(uid, ODD_SERIES_UID)
    (tmp / "labels.csv").write_text(labels)
    if (data / "masks").is_dir():  # labels.csv names them relative to itself
        shutil.copytree(data / "masks", tmp / "masks")
    return root, tmp / "labels.csv"


def test_dicom_uids_that_are_not_uid_shaped_are_pseudonymized_too(model_dir, odd_uid_archive, tmp_path):
    """A DICOM Series / Study Instance UID is pseudonymized whatever it looks like: score (CSVs,
    resume records, saliency page names and text) and ingest --nifti (CSVs, NIfTI names) never show it."""
    root, labels = odd_uid_archive
    key = _key_file(tmp_path, KEY)
    code, printed = _score(model_dir, root, tmp_path / "score", "--saliency", "--pseudonymize-uids", str(key))
    assert code == 0, printed
    _assert_no_uid(tmp_path / "score", {ODD_SERIES_UID, ODD_STUDY_UID}, KEY)
    rows = read_csv_rows(tmp_path / "score" / "predictions.csv")
    assert len(rows) == 1 and PSEUDONYM.match(rows[0]["series_uid"]) and rows[0]["report"]
    assert {r["series_uid"] for r in read_csv_rows(tmp_path / "score" / "files.csv")} == {rows[0]["series_uid"]}
    code, printed = _run(["ingest", "-q", str(root), "--out", str(tmp_path / "ingest"), "--labels", str(labels),
                          "--nifti", "--pseudonymize-uids", str(key)])
    assert code == 0, printed
    _assert_no_uid(tmp_path / "ingest", {ODD_SERIES_UID, ODD_STUDY_UID}, KEY)
    series = read_csv_rows(tmp_path / "ingest" / "series.csv")
    assert len(series) == 1 and PSEUDONYM.match(series[0]["series_uid"]) and series[0]["nifti_path"]
    manifest = read_csv_rows(tmp_path / "ingest" / "manifest.csv")
    assert manifest and {r["series_uid"] for r in manifest} == {series[0]["series_uid"]}
    ledger = read_csv_rows(tmp_path / "ingest" / "files.csv")
    assert {r["series_uid"] for r in ledger} == {series[0]["series_uid"]} and {r["status"] for r in ledger} == {"used"}
    note = json.loads((tmp_path / "ingest" / "ingest.json").read_text())["uids"]
    assert note["key_fingerprint"] == json.loads((tmp_path / "score" / "summary.json").read_text())["uids"]["key_fingerprint"]


def test_ingest_json_says_whether_uids_were_pseudonymized(odd_uid_archive, tmp_path):
    root, labels = odd_uid_archive
    code, printed = _run(["ingest", "-q", str(root), "--out", str(tmp_path / "o"), "--labels", str(labels)])
    assert code == 0, printed
    assert json.loads((tmp_path / "o" / "ingest.json").read_text())["uids"] == "as found"
    assert {r["series_uid"] for r in read_csv_rows(tmp_path / "o" / "series.csv")} == {ODD_SERIES_UID}


def test_nifti_names_carry_one_suffix(tmp_path):
    """``ingest --nifti`` of a NIfTI volume: ``<name without .nii.gz>-<hash>.nii.gz``, not ``ct.nii.gz-<hash>.nii.gz``."""
    from lung_effnet.io.volume import canonical_affine, write_nifti

    hu = np.full((3, 32, 32), -800.0)
    write_nifti(tmp_path / "src" / "P0001_ct.nii.gz", hu, canonical_affine((2.0, 1.0, 1.0)))
    write_nifti(tmp_path / "src" / "P0002_ct.NII", hu, canonical_affine((2.0, 1.0, 1.0)))
    code, printed = _run(["ingest", "-q", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--nifti"])
    assert code == 0, printed
    names = sorted(Path(r["nifti_path"]).name for r in read_csv_rows(tmp_path / "o" / "series.csv"))
    assert [re.sub(r"-[0-9a-f]{12}\.nii\.gz$", "", n) for n in names] == ["P0001_ct", "P0002_ct"], names
    assert all((tmp_path / "o" / "nifti" / n).is_file() for n in names)

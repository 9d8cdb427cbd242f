"""Manifest sources and the validation messages a user sees."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lung_effnet.errors import ManifestError
from lung_effnet.ingest.manifest import normalize_label
from lung_effnet.ingest.sources import NO_PATIENT_IDS, ingest


def _image(path, seed, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("text, label", [
    ("Bengin cases", "benign"), ("benign", "benign"), ("MALIGNANT", "malignant"),
    ("Malignant cases", "malignant"), ("Normal case", "normal"), ("normal_cases", "normal"),
    ("tumour", None), ("", None),
])
def test_normalize_label(text, label):
    assert normalize_label(text) == label


def test_class_folders_iqothnccd_layout_warns_about_patient_ids(tmp_path, caplog, read_csv):
    src = tmp_path / "src"
    for i in range(2):
        _image(src / "Bengin cases" / f"Bengin case ({i + 1}).jpg", i)
        _image(src / "Malignant cases" / f"Malignant case ({i + 1}).jpg", 10 + i)
        _image(src / "Normal cases" / f"Normal case ({i + 1}).png", 20 + i)
    (src / "notes.txt").write_text("not data")
    (src / "Normal cases" / "Thumbs.db").write_bytes(b"\0")
    result = ingest(src, tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    assert sorted(r["label"] for r in rows) == ["benign"] * 2 + ["malignant"] * 2 + ["normal"] * 2
    assert all(r["patient_id"] == "" for r in rows)
    assert NO_PATIENT_IDS in result.warnings
    assert "NO PATIENT IDS" in caplog.text
    ledger = {r["path"]: r for r in read_csv(tmp_path / "out" / "files.csv")}
    assert len(ledger) == 8
    assert ledger["notes.txt"]["status"] == "skipped"
    assert ledger["Normal cases/Thumbs.db"]["status"] == "skipped"


def test_duplicate_content_under_two_paths_is_reported(tmp_path, read_csv):
    src = tmp_path / "src"
    _image(src / "Benign" / "a.png", 1)
    _image(src / "Normal" / "b.png", 1)  # the same pixels, another class and file
    _image(src / "Normal" / "c.png", 2)
    ingest(src, tmp_path / "out", progress=False)
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert len(errors) == 1 and errors[0]["stage"] == "validate"
    assert "identical pixels to" in errors[0]["reason"]
    assert len(read_csv(tmp_path / "out" / "manifest.csv")) == 2


def test_manifest_csv_validation_messages(tmp_path, read_csv):
    for i in range(5):
        _image(tmp_path / "img" / f"{i}.png", i)
    manifest = _write(tmp_path / "m.csv", ["path", "label", "patient_id"], [
        ["img/0.png", "benign", "MRN-0001"],
        ["img/1.png", "tumour", "MRN-0002"],          # unknown label
        ["img/missing.png", "normal", "MRN-0003"],    # missing file
        ["img/2.png", "benign", "MRN-0004"],          # one patient, two labels
        ["img/3.png", "malignant", "MRN-0004"],
        ["img/4.png", "Normal", "MRN-0005"],
    ])
    ingest(manifest, tmp_path / "out", progress=False)
    errors = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert "unknown label 'tumour'" in errors["img/1.png"]
    assert errors["img/missing.png"] == "file not found"
    assert "has several labels (benign, malignant)" in errors["img/2.png"]
    assert "has several labels" in errors["img/3.png"]
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    assert [r["label"] for r in rows] == ["benign", "normal"]
    assert all(r["patient_id"].startswith("P-") for r in rows)
    out_text = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    assert "MRN-000" not in out_text  # raw patient ids never reach an output


def test_manifest_missing_column_is_one_clear_error(tmp_path):
    bad = _write(tmp_path / "m.csv", ["file", "label"], [["a.png", "benign"]])
    with pytest.raises(ManifestError, match="missing column\\(s\\) path, patient_id"):
        ingest(bad, tmp_path / "out", progress=False)


def test_a_source_given_relative_to_the_working_directory_reads_back(tmp_path, monkeypatch):
    """Manifest paths are absolute: read back from the run's ingest/manifest.csv (as the saliency
    report and ``--resume`` do) they name the same files, whatever the working directory was."""
    from lung_effnet.ingest.manifest import read_manifest
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", "dicom", n_patients=2, seed=0, size_px=32, n_slices=3, progress=False)
    monkeypatch.chdir(tmp_path)
    result = ingest("data", "out", labels_csv="data/labels.csv", progress=False)
    monkeypatch.chdir("/")
    back = read_manifest(tmp_path / "out" / "manifest.csv")
    assert [r["path"] for r in back] == [r["path"] for r in result.rows]
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in back)

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


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_bad_masks_are_error_rows_and_the_samples_are_kept_without_them(tmp_path, read_csv):
    """A mask_path that is not a mask of its slice (a text file, another size, grey levels, a label
    map, a slice it lacks, a missing file) is one error row naming the mask and why; the sample stays,
    without its mask, and training's preprocessing (where it used to crash) takes every row."""
    from lung_effnet.config import DataConfig
    from lung_effnet.io.volume import canonical_affine, write_nifti
    from lung_effnet.preprocess.cache import build_sample_set

    lesion = np.zeros((32, 32), np.uint8)
    lesion[10:20, 12:22] = 255
    for i in range(7):
        _image(tmp_path / "img" / f"{i}.png", i)
    _png(tmp_path / "masks" / "good.png", lesion)
    _png(tmp_path / "masks" / "good01.png", lesion // 255)
    _png(tmp_path / "masks" / "small.png", lesion[:16, :16])
    _png(tmp_path / "masks" / "grey.png", np.random.default_rng(0).integers(0, 255, (32, 32)))
    (tmp_path / "masks" / "notes.png").write_text("not an image")
    (tmp_path / "masks" / "notes.txt").write_text("not a mask")
    hu = np.full((3, 32, 32), -800.0)
    hu[:, 8:24, 8:24] = 40.0
    affine = canonical_affine((2.0, 1.0, 1.0))
    write_nifti(tmp_path / "vol" / "ct.nii.gz", hu, affine)
    labelmap = np.zeros((3, 32, 32), np.uint8)
    labelmap[1, 10:14, 10:14], labelmap[1, 20:24, 20:24] = 1, 2
    write_nifti(tmp_path / "masks" / "labelmap.nii.gz", labelmap, affine, dtype=np.uint8)
    write_nifti(tmp_path / "masks" / "two_slices.nii.gz", labelmap[:2] > 0, affine, dtype=np.uint8)
    manifest = _write(tmp_path / "m.csv", ["path", "label", "patient_id", "slice_index", "mask_path"], [
        ["img/0.png", "benign", "A", "", "masks/good.png"],
        ["img/1.png", "benign", "B", "", "masks/good01.png"],
        ["img/2.png", "malignant", "C", "", "masks/small.png"],
        ["img/3.png", "malignant", "D", "", "masks/grey.png"],
        ["img/4.png", "normal", "E", "", "masks/notes.png"],
        ["img/5.png", "normal", "F", "", "masks/notes.txt"],
        ["img/6.png", "normal", "G", "", "masks/missing.png"],
        ["vol/ct.nii.gz", "malignant", "H", "1", "masks/labelmap.nii.gz"],
        ["vol/ct.nii.gz", "malignant", "H", "2", "masks/two_slices.nii.gz"],
    ])
    result = ingest(manifest, tmp_path / "out", progress=False)
    errors = {r["path"]: r for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert set(errors) == {"masks/small.png", "masks/grey.png", "masks/notes.png", "masks/notes.txt",
                           "masks/missing.png", "masks/labelmap.nii.gz", "masks/two_slices.nii.gz"}, errors
    assert all(e["stage"] == "mask" and "used without a mask" in e["reason"] for e in errors.values())
    assert "mask size 16 x 16 differs from its image's 32 x 32" in errors["masks/small.png"]["reason"]
    assert "not a binary mask" in errors["masks/grey.png"]["reason"]
    assert "not a binary mask" in errors["masks/labelmap.nii.gz"]["reason"] and "2" in errors["masks/labelmap.nii.gz"]["reason"]
    assert "not readable as an image" in errors["masks/notes.png"]["reason"]
    assert "not readable as a NIfTI volume" in errors["masks/notes.txt"]["reason"]
    assert "mask file not found" in errors["masks/missing.png"]["reason"]
    assert "mask has no slice 2 (it has 2)" in errors["masks/two_slices.nii.gz"]["reason"]
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    assert len(rows) == 9  # every sample kept
    assert [Path(r["mask_path"]).name for r in rows if r["mask_path"]] == ["good.png", "good01.png"]
    samples = build_sample_set(result.rows, DataConfig(image_size=32, crop="none", context_slices=0), tmp_path / "cache",
                               progress=False)
    assert samples.mask_known is not None and samples.mask_known.sum() == 2
    assert samples.masks[samples.mask_known].sum() > 0


def test_a_label_map_as_a_series_mask_is_an_error_row(tmp_path, read_csv):
    """Tree sources check masks too: right shape, but not binary."""
    from lung_effnet.io.volume import canonical_affine, write_nifti

    affine = canonical_affine((2.0, 1.0, 1.0))
    hu = np.full((3, 32, 32), -800.0)
    write_nifti(tmp_path / "src" / "ct.nii.gz", hu, affine)
    labelmap = np.zeros((3, 32, 32), np.uint8)
    labelmap[1, 4:8, 4:8] = 3
    write_nifti(tmp_path / "masks" / "m.nii.gz", labelmap, affine, dtype=np.uint8)
    labels = _write(tmp_path / "labels.csv", ["path", "label", "patient_id", "mask_path"],
                    [["src/ct.nii.gz", "benign", "A", "masks/m.nii.gz"]])
    ingest(tmp_path / "src", tmp_path / "out", labels_csv=labels, progress=False)
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert len(errors) == 1 and errors[0]["stage"] == "mask" and "not a binary mask" in errors[0]["reason"], errors
    assert {r["mask_path"] for r in read_csv(tmp_path / "out" / "manifest.csv")} == {""}


def test_jpeg_and_palette_masks_are_accepted_and_read_as_their_lesion(tmp_path, read_csv, caplog):
    """Masks that worked with ``mask > 0`` before the binary check stay usable: a 0 / 255 mask saved
    as JPEG (noise: 1..5 and 250..254 near edges) and a palette PNG with indices 0 / 1 (whose luma is
    not 1) give no error row, and training reads exactly the intended lesion from them (threshold
    128 for 8-bit masks, palette indices); a label map 0 / 1 / 2 / 3 is still refused."""
    from lung_effnet.preprocess.cache import mask_plane

    lesion = np.zeros((64, 64), np.uint8)
    lesion[13:37, 19:45] = 255
    for i in range(3):
        _image(tmp_path / "img" / f"{i}.png", i, size=64)
    (tmp_path / "masks").mkdir()
    Image.fromarray(lesion).save(tmp_path / "masks" / "lesion.jpg", quality=90)
    jpeg = np.asarray(Image.open(tmp_path / "masks" / "lesion.jpg"))
    assert set(np.unique(jpeg)) - {0, 255}  # really not binary
    palette = Image.fromarray((lesion // 255).astype(np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
    palette.save(tmp_path / "masks" / "palette.png")
    assert np.asarray(Image.open(tmp_path / "masks" / "palette.png").convert("L")).max() not in (0, 1, 255)
    labelmap = np.zeros((64, 64), np.uint8)
    labelmap[5:10, 5:10], labelmap[20:30, 20:30], labelmap[40:50, 40:50] = 1, 2, 3
    _png(tmp_path / "masks" / "labels3.png", labelmap)
    manifest = _write(tmp_path / "m.csv", ["path", "label", "patient_id", "mask_path"], [
        ["img/0.png", "benign", "A", "masks/lesion.jpg"],
        ["img/1.png", "malignant", "B", "masks/palette.png"],
        ["img/2.png", "normal", "C", "masks/labels3.png"],
    ])
    result = ingest(manifest, tmp_path / "out", progress=False)
    errors = {r["path"]: r for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert set(errors) == {"masks/labels3.png"}, errors
    assert "not a binary mask" in errors["masks/labels3.png"]["reason"]
    rows = {Path(r["path"]).name: r for r in result.rows}
    assert Path(rows["0.png"]["mask_path"]).name == "lesion.jpg" and Path(rows["1.png"]["mask_path"]).name == "palette.png"
    assert rows["2.png"]["mask_path"] == ""
    for name in ("0.png", "1.png"):
        plane = mask_plane(rows[name])
        assert plane is not None and np.array_equal(plane, lesion > 0), name


def test_near_binary_rule_refuses_grey_images_and_label_maps():
    from lung_effnet.io.masks import lesion, mask_values_problem

    grey = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.float32)
    assert "not a binary mask" in (mask_values_problem(grey) or "")
    labels = np.zeros((64, 64), np.float32)
    labels[:10, :10], labels[20:30, 20:30], labels[40:50, 40:50] = 1, 2, 3
    assert "not a binary mask" in (mask_values_problem(labels) or "")
    noisy = np.zeros((64, 64), np.float32)
    noisy[10:30, 10:30] = 252
    noisy[0, :5] = 3
    assert mask_values_problem(noisy) is None
    assert np.array_equal(lesion(noisy), noisy >= 128)
    assert np.array_equal(lesion(np.where(noisy > 128, 1, 0)), noisy > 128)
    assert mask_values_problem(np.full((4, 4), np.nan)) is not None

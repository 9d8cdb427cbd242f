"""Synthetic phantoms, the DICOM writer and the synthetic dataset layouts (small and fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError
from lung_effnet.io.volume import affine_from_lps, canonical_affine
from lung_effnet.synthetic.dataset import assign_labels, window_to_uint8, write_synthetic_dataset
from lung_effnet.synthetic.dicom_writer import write_dicom_series, write_localizer, write_sr
from lung_effnet.synthetic.phantom import PADDING_HU, make_phantom

SIZE, SLICES = 64, 8
CLASS_WORDS = re.compile(r"benign|bengin|malignant|normal", re.IGNORECASE)


def phantom(label: str, seed: int, **kw):
    return make_phantom(label, np.random.default_rng(seed), size_px=kw.pop("size_px", SIZE),
                        n_slices=kw.pop("n_slices", SLICES), **kw)


@pytest.fixture(scope="module")
def cohort():
    """30 phantoms, 10 per class, each from its own seed (as a dataset makes them)."""
    return [phantom(CLASSES[i % 3], 1000 + i) for i in range(30)]


def read_series(paths) -> tuple[np.ndarray, list]:
    """HU volume in slice order (sorted by ImagePositionPatient z, as a reader must) + datasets."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    return hu, datasets


# ------------------------------------------------------------------------------ phantoms


def test_phantom_shapes_units_and_geometry():
    p = phantom("malignant", 0)
    assert p.hu.shape == p.mask.shape == p.lungs.shape == (SLICES, SIZE, SIZE)
    assert p.hu.dtype == np.float32 and p.mask.dtype == np.uint8
    assert p.spacing == (2.5, 350 / SIZE, 350 / SIZE)
    assert p.label == "malignant"
    assert p.hu.min() >= PADDING_HU and p.hu.max() <= 3071
    # HU where they belong: air in the corner, lung parenchyma, some bone
    assert p.hu[:, 0, 0].max() == PADDING_HU
    lung_hu = np.median(p.hu[p.lungs.astype(bool) & (p.mask == 0)])
    assert -900 < lung_hu < -700
    assert (p.hu > 300).any()
    # canonical orientation: the spine is posterior (high row index), the sternum anterior
    bone_rows = np.nonzero((p.hu > 400).any(axis=(0, 2)))[0]
    assert bone_rows.max() > SIZE * 0.6


def test_label_is_checked_and_case_insensitive():
    assert phantom("Benign", 1).label == "benign"
    with pytest.raises(ValueError, match="label"):
        phantom("bengin", 1)
    with pytest.raises(ValueError, match="n_slices"):
        phantom("malignant", 1, n_slices=2)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = phantom("benign", 7), phantom("benign", 7), phantom("benign", 8)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.mask, b.mask) and a.lesions == b.lesions
    assert a.origin_lps == b.origin_lps and a.params == b.params
    assert not np.array_equal(a.hu, c.hu)


def test_anatomy_and_noise_do_not_depend_on_the_label():
    """Same patient seed, three labels: everything away from the lesion is identical."""
    ps = {label: phantom(label, 21) for label in CLASSES}
    normal = ps["normal"]
    for label in ("benign", "malignant"):
        p = ps[label]
        assert p.params == normal.params and np.array_equal(p.lungs, normal.lungs)
        changed = p.hu != normal.hu
        # lesion, its partial-volume fringe, spicules and the blur kernel stay within 30 mm of the mask
        near = ndimage.distance_transform_edt(p.mask == 0, sampling=p.spacing) <= 30
        assert changed.any() and not (changed & ~near).any()


def test_masks_empty_for_normal_and_on_three_slices_for_lesions():
    for seed in range(12):
        assert phantom("normal", seed).mask.sum() == 0
        for label in ("benign", "malignant"):
            p = phantom(label, seed)
            assert p.mask.any(axis=(1, 2)).sum() >= 3, (label, seed)
            assert p.lesions and p.lesions[0].n_slices >= 3


def test_three_slices_also_at_128px_and_thin_slices():
    for seed in range(3):
        for kw in ({"size_px": 128, "n_slices": 24}, {"size_px": 96, "n_slices": 20, "slice_mm": 1.25}):
            p = phantom("benign", seed, **kw)
            assert p.mask.any(axis=(1, 2)).sum() >= 3


def test_lesions_are_inside_the_lungs_and_3d(cohort):
    for p in cohort:
        if p.label == "normal":
            continue
        lungs = p.lungs.astype(bool)
        assert not (p.mask.astype(bool) & ~lungs).any()
        for lesion in p.lesions:
            k, j, i = (int(round(c)) for c in lesion.centre_vox)
            assert lungs[k, j, i] or p.mask[k, j, i]


def test_lesion_morphology_by_class(cohort):
    benign = [p for p in cohort if p.label == "benign"]
    malignant = [p for p in cohort if p.label == "malignant"]
    for p in benign:
        assert 1 <= len(p.lesions) <= 2
        assert all(5 <= les.diameter_mm <= 12 and les.kind in ("solid", "calcified") for les in p.lesions)
        assert all(les.rim_hu is None for les in p.lesions)
    for p in malignant:
        (les,) = p.lesions
        assert 15 <= les.diameter_mm <= 30 and les.kind in ("lobulated", "spiculated")
        assert -500 <= les.rim_hu <= -300
    volume = {name: np.mean([p.mask.sum() * np.prod(p.spacing) for p in group])
              for name, group in (("benign", benign), ("malignant", malignant))}
    assert volume["benign"] * 5 < volume["malignant"]
    assert np.mean([les.diameter_mm for p in benign for les in p.lesions]) < np.mean(
        [p.lesions[0].diameter_mm for p in malignant])


def test_some_benign_nodules_are_calcified():
    lesions = [les for seed in range(15) for les in phantom("benign", seed).lesions]
    calcified = [les.core_hu for les in lesions if les.kind == "calcified"]
    assert 0 < len(calcified) < len(lesions)
    assert all(200 <= hu <= 600 for hu in calcified)


def test_no_class_shortcut_outside_the_lesion(cohort):
    """Mean HU away from lesions, noise level and vessel count are statistically the same in every
    class: each pair of class means differs by less than 3.5 standard errors (Welch), and by less
    than the spread within a class for the image statistics. (The exact statement, same seed ->
    same patient whatever the label, is tested above.)"""
    def stats(p):
        far = ndimage.distance_transform_edt(p.mask == 0, sampling=p.spacing) > 30
        air = p.hu[:, 2:6, SIZE // 2 - 8:SIZE // 2 + 8]  # anterior air, inside the scan circle
        return p.hu[far].mean(), air.std(), p.params["n_vessel_segments"]

    values = {c: np.array([stats(p) for p in cohort if p.label == c]) for c in CLASSES}
    for column in range(3):
        for a, b in ((0, 1), (0, 2), (1, 2)):
            va, vb = values[CLASSES[a]][:, column], values[CLASSES[b]][:, column]
            se = np.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb))
            assert abs(va.mean() - vb.mean()) < 3.5 * se, (column, CLASSES[a], CLASSES[b])
            if column < 2:
                assert abs(va.mean() - vb.mean()) < min(va.std(), vb.std()), (column, CLASSES[a], CLASSES[b])


def test_vessels_persist_across_slices():
    p = phantom("normal", 3, size_px=128, n_slices=12)
    vessels = p.lungs.astype(bool) & (p.hu > -400)
    labelled, n = ndimage.label(vessels)
    sizes = ndimage.find_objects(labelled)
    spans = [s[0].stop - s[0].start for s in sizes]
    assert n > 20 and sum(span >= 2 for span in spans) > 10  # tubes, not 2D dots


# ------------------------------------------------------------------------------ DICOM writer


@pytest.mark.parametrize("storage", ["signed", "unsigned"])
@pytest.mark.parametrize("compression", [None, "jpeg2000", "jpegls", "rle"])
def test_dicom_round_trip_is_lossless(tmp_path, compression, storage):
    p = phantom("malignant", 5, n_slices=6)
    paths = write_dicom_series(p.hu, p.spacing, tmp_path, patient_id="SYN-1", patient_name="SYNTH^A",
                               rng=np.random.default_rng(0), compression=compression, storage=storage,
                               origin_lps=p.origin_lps)
    assert len(paths) == 6 and all(q.parent == tmp_path for q in paths)
    hu, datasets = read_series(paths)
    assert np.array_equal(hu, np.rint(p.hu))
    ds = datasets[0]
    expected_ts = {None: pydicom.uid.ExplicitVRLittleEndian, "jpeg2000": pydicom.uid.JPEG2000Lossless,
                   "jpegls": pydicom.uid.JPEGLSLossless, "rle": pydicom.uid.RLELossless}[compression]
    assert ds.file_meta.TransferSyntaxUID == expected_ts
    assert ds.PixelRepresentation == (1 if storage == "signed" else 0)
    assert float(ds.RescaleIntercept) == (0 if storage == "signed" else -1024)
    assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage


def test_dicom_geometry_matches_the_canonical_orientation(tmp_path):
    p = phantom("benign", 2, n_slices=5)
    paths = write_dicom_series(p.hu, p.spacing, tmp_path, patient_id="SYN-2", patient_name="SYNTH^B",
                               rng=np.random.default_rng(1), origin_lps=p.origin_lps)
    datasets = [pydicom.dcmread(q) for q in paths]  # returned in slice order
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert np.allclose(np.diff(z), p.spacing[0])
    d0 = datasets[0]
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in d0.PixelSpacing] == [p.spacing[1], p.spacing[2]]
    assert float(d0.SliceThickness) == float(d0.SpacingBetweenSlices) == p.spacing[0]
    affine = affine_from_lps([float(v) for v in d0.ImagePositionPatient], (1, 0, 0), (0, 1, 0), (0, 0, 1), p.spacing)
    assert np.allclose(affine, canonical_affine(p.spacing, p.origin_lps), atol=1e-6)


def test_dicom_names_and_instance_numbers_say_nothing_about_order(tmp_path):
    vol = phantom("normal", 3, n_slices=6).hu
    kw = dict(patient_id="SYN-3", patient_name="SYNTH^C", origin_lps=(0, 0, 0))
    paths = write_dicom_series(vol, (2.5, 1, 1), tmp_path / "a", rng=np.random.default_rng(2),
                               shuffle_instance_number=True, **kw)
    assert all(re.fullmatch(r"[0-9a-f]{16}\.dcm", q.name) for q in paths)
    assert [q.name for q in paths] != sorted(q.name for q in paths)
    numbers = [int(pydicom.dcmread(q).InstanceNumber) for q in paths]
    assert sorted(numbers) == list(range(1, 7)) and numbers != list(range(1, 7))
    paths = write_dicom_series(vol, (2.5, 1, 1), tmp_path / "b", rng=np.random.default_rng(2),
                               omit_instance_number=True, shuffle_names=False, **kw)
    assert [q.name for q in paths] == [f"slice_{k:04d}.dcm" for k in range(6)]
    assert all("InstanceNumber" not in pydicom.dcmread(q) for q in paths)


def test_dicom_uids_are_deterministic_and_phi_can_be_planted(tmp_path):
    vol = phantom("normal", 4, n_slices=3).hu

    def write(folder, seed, phi=None):
        paths = write_dicom_series(vol, (2.5, 1, 1), tmp_path / folder, patient_id="SYN-4",
                                   patient_name="SYNTH^D", rng=np.random.default_rng(seed), phi=phi)
        return [pydicom.dcmread(q) for q in paths], paths

    (a, pa), (b, pb), (c, _) = write("a", 9), write("b", 9), write("c", 10)
    uids = lambda ds: [(d.SOPInstanceUID, d.SeriesInstanceUID, d.StudyInstanceUID, d.FrameOfReferenceUID) for d in ds]
    assert uids(a) == uids(b) and [q.name for q in pa] == [q.name for q in pb]
    assert [q.read_bytes() for q in pa] == [q.read_bytes() for q in pb]
    assert not set(u[0] for u in uids(a)) & set(u[0] for u in uids(c))
    assert len({d.SOPInstanceUID for d in a}) == 3 and len({d.SeriesInstanceUID for d in a}) == 1
    (d, _) = write("d", 9, phi={"PatientName": "CANARY^NAME", "InstitutionName": "CANARY-INST"})
    assert str(d[0].PatientName) == "CANARY^NAME" and d[0].InstitutionName == "CANARY-INST"
    for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate"):
        assert keyword in a[0]
    with pytest.raises(ValueError, match="keyword"):
        write("e", 9, phi={"NotATag": "x"})


def test_localizer_and_sr(tmp_path):
    p = phantom("normal", 6, n_slices=6)
    series = write_dicom_series(p.hu, p.spacing, tmp_path, patient_id="SYN-6", patient_name="SYNTH^F",
                                rng=np.random.default_rng(3), origin_lps=p.origin_lps)
    ct = pydicom.dcmread(series[0])
    loc = pydicom.dcmread(write_localizer(p.hu, p.spacing, tmp_path, patient_id="SYN-6", patient_name="SYNTH^F",
                                          rng=np.random.default_rng(4), study_uid=ct.StudyInstanceUID,
                                          origin_lps=p.origin_lps))
    assert list(loc.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in loc.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert loc.StudyInstanceUID == ct.StudyInstanceUID and loc.SeriesInstanceUID != ct.SeriesInstanceUID
    assert loc.PatientID == ct.PatientID and loc.pixel_array.shape == (6, SIZE)
    sr = pydicom.dcmread(write_sr(tmp_path, patient_id="SYN-6", patient_name="SYNTH^F",
                                  rng=np.random.default_rng(5), study_uid=ct.StudyInstanceUID))
    assert sr.SOPClassUID == pydicom.uid.BasicTextSRStorage and sr.Modality == "SR"
    assert "PixelData" not in sr and sr.StudyInstanceUID == ct.StudyInstanceUID
    assert sr.ContentSequence[0].ValueType == "TEXT"


# ------------------------------------------------------------------------------ datasets


def relative_files(root: Path) -> list[str]:
    return sorted(q.relative_to(root).as_posix() for q in root.rglob("*") if q.is_file())


def test_labels_are_a_seeded_balanced_shuffle():
    for n in range(3, 12):
        labels = assign_labels(n, np.random.default_rng(n))
        counts = [labels.count(c) for c in CLASSES]
        assert sum(counts) == n and min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert assign_labels(9, np.random.default_rng(0)) == assign_labels(9, np.random.default_rng(0))
    skewed = assign_labels(10, np.random.default_rng(0), {"benign": 0.1, "malignant": 0.2, "normal": 0.7})
    assert [skewed.count(c) for c in CLASSES] == [1, 2, 7]


def test_dicom_dataset_layout_labels_masks_and_extras(tmp_path, read_csv):
    out = write_synthetic_dataset(tmp_path / "d", "dicom", n_patients=6, seed=3, size_px=SIZE, n_slices=6,
                                  extras=True, progress=False)
    files = relative_files(out)
    assert not [f for f in files if CLASS_WORDS.search(f)]
    assert sorted({f.split("/")[0] for f in files if "/" in f}) == ["P0001", "P0002", "P0003", "P0004",
                                                                     "P0005", "P0006", "masks"]
    rows = read_csv(out / "labels.csv")
    assert list(rows[0]) == ["series_uid", "label", "mask_path"]
    assert {r["label"] for r in rows} == set(CLASSES)
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["seed"] == 3 and meta["fmt"] == "dicom" and sum(meta["counts"].values()) == 6
    by_series: dict[str, list] = {}
    kinds = []
    for f in files:
        if f.endswith(".dcm"):
            ds = pydicom.dcmread(out / f)
            if "LOCALIZER" in ds.get("ImageType", []) or ds.Modality == "SR":
                kinds.append(ds.Modality + ("-loc" if ds.Modality == "CT" else ""))
            else:
                assert re.fullmatch(r"SYN-\d+", ds.PatientID) and str(ds.PatientName).startswith("SYNTH^PATIENT")
                by_series.setdefault(ds.SeriesInstanceUID, []).append(out / f)
    assert kinds.count("CT-loc") == 3 and kinds.count("SR") == 2
    for row in rows:
        hu, datasets = read_series(by_series[row["series_uid"]])
        mask = nib.load(out / row["mask_path"])
        d0 = datasets[0]
        expected = affine_from_lps([float(v) for v in d0.ImagePositionPatient], (1, 0, 0), (0, 1, 0), (0, 0, 1),
                                   (float(d0.SpacingBetweenSlices), *map(float, d0.PixelSpacing)))
        assert np.allclose(mask.affine, expected, atol=1e-4)
        m = np.asarray(mask.dataobj).transpose(2, 1, 0)
        assert m.shape == hu.shape and (m.any() == (row["label"] != "normal"))
        if m.any():  # the mask sits on the lesion: denser than the lung around it
            assert hu[m > 0].mean() > -600  # lung is about -850; partial volume dilutes small nodules


def test_dataset_is_deterministic_by_seed(tmp_path):
    kw = dict(n_patients=3, size_px=48, n_slices=4, progress=False)
    a = write_synthetic_dataset(tmp_path / "a", "dicom", seed=5, compression="rle", **kw)
    b = write_synthetic_dataset(tmp_path / "b", "dicom", seed=5, compression="rle", **kw)
    c = write_synthetic_dataset(tmp_path / "c", "dicom", seed=6, compression="rle", **kw)
    files = relative_files(a)
    assert files == relative_files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if not f.endswith(".gz"))
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
    assert (a / "labels.csv").read_text() != (c / "labels.csv").read_text()
    # rewriting over a previous synthetic dataset is fine; over anything else it is refused
    write_synthetic_dataset(a, "dicom", seed=5, compression="rle", **kw)
    assert relative_files(a) == files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_synthetic_dataset(tmp_path / "other", "dicom", seed=5, **kw)


def test_nifti_dataset(tmp_path, read_csv):
    out = write_synthetic_dataset(tmp_path / "n", "nifti", n_patients=3, seed=4, size_px=SIZE, n_slices=5,
                                  progress=False)
    assert not [f for f in relative_files(out) if CLASS_WORDS.search(f)]
    rows = read_csv(out / "labels.csv")
    assert list(rows[0]) == ["path", "label", "patient_id", "mask_path"]
    assert sorted(r["label"] for r in rows) == sorted(CLASSES)
    for row in rows:
        img, mask = nib.load(out / row["path"]), nib.load(out / row["mask_path"])
        assert img.get_data_dtype() == np.int16 and np.allclose(img.affine, mask.affine)
        assert img.shape == (SIZE, SIZE, 5)
        assert np.allclose(np.diag(img.affine)[:3], [-350 / SIZE, -350 / SIZE, 2.5])  # RAS of L, P, S axes


def test_jpg_dataset_has_the_iqoth_layout(tmp_path, read_csv):
    out = write_synthetic_dataset(tmp_path / "j", "jpg", n_patients=6, seed=2, size_px=SIZE, n_slices=SLICES,
                                  progress=False)
    folders = sorted(q.name for q in out.iterdir() if q.is_dir())
    assert folders == ["Bengin cases", "Malignant cases", "Normal cases", "masks"]
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "patient_id", "mask_path"]
    stems = {"benign": "Bengin", "malignant": "Malignant", "normal": "Normal"}
    for label, stem in stems.items():
        names = sorted(q.name for q in (out / f"{stem} cases").iterdir())
        numbers = sorted(int(re.fullmatch(rf"{stem} case \((\d+)\)\.jpg", n).group(1)) for n in names)
        assert numbers == list(range(1, len(names) + 1))
        mine = [r for r in rows if r["label"] == label]
        assert sorted(Path(r["path"]).name for r in mine) == names
    for row in rows:
        img = Image.open(out / row["path"])
        assert img.mode == "L" and img.size == (SIZE, SIZE) and img.format == "JPEG"
        mask = np.asarray(Image.open(out / row["mask_path"]))
        assert set(np.unique(mask)) <= {0, 255}
        if row["label"] == "normal":
            assert not mask.any()
    for label in ("benign", "malignant"):  # lesion slices plus a couple without
        masks = [np.asarray(Image.open(out / r["mask_path"])).any() for r in rows if r["label"] == label]
        assert 0 < sum(masks) < len(masks)
    # numbering is shuffled: consecutive numbers are not one patient's consecutive slices
    malignant = sorted((r for r in rows if r["label"] == "malignant"),
                       key=lambda r: int(re.search(r"\((\d+)\)", r["path"]).group(1)))
    assert [r["mask_path"] for r in malignant] != sorted(r["mask_path"] for r in malignant)


def test_lung_window():
    assert list(window_to_uint8(np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0]))) == [0, 0, 128, 255, 255]


def test_bad_arguments_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic_dataset(tmp_path / "x", "png", n_patients=1, seed=0)
    with pytest.raises(ValueError, match="dicom"):
        write_synthetic_dataset(tmp_path / "x", "nifti", n_patients=1, seed=0, compression="rle")
    with pytest.raises(ValueError, match="compression"):
        write_dicom_series(np.zeros((2, 4, 4)), (1, 1, 1), tmp_path, patient_id="a", patient_name="b",
                           rng=np.random.default_rng(0), compression="jpeg")
    with pytest.raises(ValueError, match="unsigned"):
        write_dicom_series(np.full((2, 4, 4), -2000.0), (1, 1, 1), tmp_path, patient_id="a", patient_name="b",
                           rng=np.random.default_rng(0), storage="unsigned")

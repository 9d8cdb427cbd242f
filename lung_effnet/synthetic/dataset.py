"""Write a whole synthetic dataset of chest CT phantoms (DICOM, NIfTI or IQ-OTH/NCCD-style JPG).

Deterministic by seed: ``np.random.SeedSequence(seed)`` is spawned once; child 0 assigns the labels,
child ``i + 1`` makes patient ``i`` (its phantom and its DICOM identifiers), so a patient's anatomy
does not depend on how many patients are written. Labels come from a seeded shuffle of a balanced
list (every class appears when ``n_patients >= 3``). Layouts (all paths relative to ``out_dir``):

``fmt="dicom"``::

    P0001/<random hex>.dcm ...       one axial CT series per patient (+ a localizer / an SR in some
                                     folders with ``extras=True``)
    masks/P0001.nii.gz               lesion mask, same geometry as the series
    labels.csv                       series_uid,label,mask_path

``fmt="nifti"``::

    P0001/ct.nii.gz                  int16 HU, canonical affine
    masks/P0001.nii.gz
    labels.csv                       path,label,patient_id,mask_path

``fmt="jpg"`` (the IQ-OTH/NCCD release, its spelling ``Bengin`` included)::

    Bengin cases/Bengin case (1).jpg     8-bit lung window (centre -600, width 1500)
    Malignant cases/Malignant case (1).jpg
    Normal cases/Normal case (1).jpg
    masks/P0001_z007.png             0 / 255 lesion mask of that slice
    manifest.csv                     path,label,patient_id,mask_path

plus ``synthetic.json`` (the parameters and the counts per class). Folder and file names of the
DICOM and NIfTI layouts carry no class word; patient folders are numbered, not labelled.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError
from lung_effnet.io.ledger import write_csv
from lung_effnet.io.volume import canonical_affine, write_nifti
from lung_effnet.synthetic.dicom_writer import COMPRESSIONS, STORAGES, write_dicom_series, write_localizer, write_sr
from lung_effnet.synthetic.phantom import Phantom, make_phantom
from lung_effnet.version import __version__

FORMATS = ("dicom", "nifti", "jpg")
IQOTH_FOLDERS = {"benign": "Bengin", "malignant": "Malignant", "normal": "Normal"}
"""Class -> the IQ-OTH/NCCD folder and file stem (``Bengin cases/Bengin case (1).jpg``)."""
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
_OWN_ENTRIES = ("labels.csv", "manifest.csv", "synthetic.json", "masks")


def write_synthetic_dataset(
    out_dir,
    fmt: str,
    n_patients: int,
    seed: int,
    size_px: int = 128,
    n_slices: int = 24,
    compression: str | None = None,
    storage: str = "signed",
    class_fractions=None,
    phi: dict | None = None,
    extras: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``n_patients`` synthetic chest CT phantoms in one of the layouts above.

    Args:
        out_dir: output folder; created, or emptied of a previous synthetic dataset (recognised by
            its ``synthetic.json``). Any other non-empty folder is refused.
        fmt: ``dicom``, ``nifti`` or ``jpg``.
        n_patients: number of patients (>= 1).
        seed: the whole dataset is a function of it (and of the other arguments).
        size_px, n_slices: matrix size and slices per patient (see :func:`make_phantom`).
        compression: DICOM only: ``None``, ``jpeg2000``, ``jpegls`` or ``rle`` (lossless).
        storage: DICOM only: ``signed`` or ``unsigned`` pixel storage.
        class_fractions: share of each class, a mapping ``{label: fraction}`` or a sequence in
            :data:`lung_effnet.CLASSES` order; default equal thirds.
        phi: DICOM only: keyword -> value written into every file (canary PHI for tests).
        extras: DICOM only: add a localizer to every second patient folder and a text SR to every
            third (which folders depends on the index, never on the label).
        progress: show a tqdm progress bar over patients.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    fmt = str(fmt).lower()
    _check_arguments(fmt, n_patients, compression, storage, phi, extras)
    out = _prepare_out_dir(Path(out_dir))
    root = np.random.SeedSequence(seed)
    children = root.spawn(n_patients + 1)
    dataset_rng = np.random.default_rng(children[0])
    labels = assign_labels(n_patients, dataset_rng, class_fractions)
    writer = {"dicom": _DicomWriter, "nifti": _NiftiWriter, "jpg": _JpgWriter}[fmt](
        out, compression=compression, storage=storage, phi=phi, extras=extras)
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    for i in tqdm(range(n_patients), desc=f"synthetic {fmt}", unit="patient", disable=not progress):
        phantom_ss, writer_ss = children[i + 1].spawn(2)
        phantom = make_phantom(labels[i], np.random.default_rng(phantom_ss), size_px=size_px, n_slices=n_slices)
        writer.add(i, phantom, np.random.default_rng(writer_ss))
    table = writer.finish(dataset_rng)
    counts = {c: labels.count(c) for c in CLASSES}
    meta = {
        "generator": "lung_effnet.synthetic.phantom", "version": __version__, "seed": seed, "fmt": fmt,
        "n_patients": n_patients, "size_px": size_px, "n_slices": n_slices,
        "compression": compression, "storage": storage, "extras": extras,
        "class_fractions": _fractions(class_fractions), "counts": counts, "table": table,
        "phi_keywords": sorted(phi or {}),  # the values may be canaries: never copied
    }
    if fmt == "jpg":
        meta["images"] = writer.image_counts
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def assign_labels(n_patients: int, rng: np.random.Generator, class_fractions=None) -> list[str]:
    """A seeded shuffle of a balanced list: class counts by largest remainder, at least one of
    every class with a positive fraction when there are enough patients."""
    fractions = _fractions(class_fractions)
    share = np.array([fractions[c] for c in CLASSES]) * n_patients
    counts = np.floor(share).astype(int)
    for k in np.argsort(-(share - counts), kind="stable")[: n_patients - counts.sum()]:
        counts[k] += 1
    positive = [k for k, c in enumerate(CLASSES) if fractions[c] > 0]
    if n_patients >= len(positive):
        for k in positive:
            if counts[k] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[k] = 1
    labels = [c for c, n in zip(CLASSES, counts) for _ in range(n)]
    return [labels[k] for k in rng.permutation(len(labels))]


def _fractions(class_fractions) -> dict[str, float]:
    if class_fractions is None:
        return {c: 1 / len(CLASSES) for c in CLASSES}
    if isinstance(class_fractions, dict):
        unknown = set(class_fractions) - set(CLASSES)
        if unknown:
            raise InputError(f"class_fractions: unknown classes {sorted(unknown)}; expected {CLASSES}")
        values = [float(class_fractions.get(c, 0.0)) for c in CLASSES]
    else:
        values = [float(v) for v in class_fractions]
        if len(values) != len(CLASSES):
            raise InputError(f"class_fractions: expected {len(CLASSES)} values in {CLASSES} order, got {values}")
    if min(values) < 0 or sum(values) <= 0:
        raise InputError(f"class_fractions must be >= 0 with a positive sum, got {values}")
    return {c: v / sum(values) for c, v in zip(CLASSES, values)}


def _check_arguments(fmt, n_patients, compression, storage, phi, extras):
    if fmt not in FORMATS:
        raise InputError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if int(n_patients) < 1:
        raise InputError(f"n_patients must be >= 1, got {n_patients}")
    if compression not in COMPRESSIONS:
        raise InputError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
    if storage not in STORAGES:
        raise InputError(f"storage must be one of {STORAGES}, got {storage!r}")
    if fmt != "dicom" and (compression is not None or storage != "signed" or phi or extras):
        raise InputError("compression, storage, phi and extras apply to fmt='dicom' only")


def _prepare_out_dir(out: Path) -> Path:
    """Create ``out``; clear what a previous synthetic dataset wrote there (nothing else)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"not a folder: {out}")
    if out.exists() and any(out.iterdir()):
        if not (out / "synthetic.json").is_file():
            raise InputError(f"{out} is not empty and holds no synthetic dataset; choose an empty folder")
        own = set(_OWN_ENTRIES) | {f"{v} cases" for v in IQOTH_FOLDERS.values()}
        for entry in out.iterdir():
            is_patient = entry.is_dir() and entry.name.startswith("P") and entry.name[1:].isdigit()
            if entry.name in own or is_patient:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _patient_folder(i: int) -> str:
    return f"P{i + 1:04d}"


def _patient_id(i: int, rng: np.random.Generator) -> str:
    return f"SYN-{i + 1:04d}{int(rng.integers(0, 10**6)):06d}"


def _origin(phantom: Phantom) -> tuple[float, float, float]:
    """The origin as DICOM will hold it (decimal strings), so masks and series agree exactly."""
    x, y, z = (round(float(v), 4) for v in phantom.origin_lps)
    return x, y, z


class _DicomWriter:
    columns = ("series_uid", "label", "mask_path")

    def __init__(self, out: Path, *, compression, storage, phi, extras):
        self.out, self.compression, self.storage, self.phi, self.extras = out, compression, storage, phi, extras
        self.rows: list[dict] = []

    def add(self, i: int, phantom: Phantom, rng: np.random.Generator) -> None:
        folder = _patient_folder(i)
        patient_id, name = _patient_id(i, rng), f"SYNTH^PATIENT{i + 1}"
        origin = _origin(phantom)
        token = rng.bytes(16).hex()
        study_uid = generate_uid(entropy_srcs=[token, "study"])
        series_uid = generate_uid(entropy_srcs=[token, "series"])
        write_dicom_series(
            phantom.hu, phantom.spacing, self.out / folder, patient_id=patient_id, patient_name=name,
            rng=rng, compression=self.compression, storage=self.storage, phi=self.phi,
            study_uid=study_uid, series_uid=series_uid, origin_lps=origin)
        if self.extras and i % 2 == 0:
            write_localizer(phantom.hu, phantom.spacing, self.out / folder, patient_id=patient_id,
                            patient_name=name, rng=rng, study_uid=study_uid, phi=self.phi, origin_lps=origin)
        if self.extras and i % 3 == 0:
            write_sr(self.out / folder, patient_id=patient_id, patient_name=name, rng=rng,
                     study_uid=study_uid, phi=self.phi)
        mask_rel = f"masks/{folder}.nii.gz"
        write_nifti(self.out / mask_rel, phantom.mask, canonical_affine(phantom.spacing, origin), dtype=np.uint8)
        self.rows.append({"series_uid": series_uid, "label": phantom.label, "mask_path": mask_rel})

    def finish(self, rng) -> str:
        write_csv(self.out / "labels.csv", self.columns, self.rows)
        return "labels.csv"


class _NiftiWriter:
    columns = ("path", "label", "patient_id", "mask_path")

    def __init__(self, out: Path, **_):
        self.out = out
        self.rows: list[dict] = []

    def add(self, i: int, phantom: Phantom, rng: np.random.Generator) -> None:
        folder = _patient_folder(i)
        affine = canonical_affine(phantom.spacing, _origin(phantom))
        write_nifti(self.out / folder / "ct.nii.gz", phantom.hu, affine, dtype=np.int16)
        mask_rel = f"masks/{folder}.nii.gz"
        write_nifti(self.out / mask_rel, phantom.mask, affine, dtype=np.uint8)
        self.rows.append({"path": f"{folder}/ct.nii.gz", "label": phantom.label,
                          "patient_id": _patient_id(i, rng), "mask_path": mask_rel})

    def finish(self, rng) -> str:
        write_csv(self.out / "labels.csv", self.columns, self.rows)
        return "labels.csv"


class _JpgWriter:
    """IQ-OTH/NCCD layout. Images are kept encoded in memory until every patient is done, so the
    numbers in ``Malignant case (n).jpg`` can be a shuffle over all the class's images."""

    columns = ("path", "label", "patient_id", "mask_path")

    def __init__(self, out: Path, **_):
        self.out = out
        self.images: dict[str, list[tuple[bytes, str, str]]] = {c: [] for c in CLASSES}
        self.image_counts: dict[str, int] = {}

    def add(self, i: int, phantom: Phantom, rng: np.random.Generator) -> None:
        patient_id = _patient_id(i, rng)
        (self.out / "masks").mkdir(exist_ok=True)
        for k in _pick_slices(phantom, rng):
            mask_rel = f"masks/{_patient_folder(i)}_z{k:03d}.png"
            _save_png(self.out / mask_rel, phantom.mask[k] * np.uint8(255))
            self.images[phantom.label].append((_encode_jpg(window_to_uint8(phantom.hu[k])), patient_id, mask_rel))

    def finish(self, rng) -> str:
        rows = []
        for label in CLASSES:
            stem = IQOTH_FOLDERS[label]
            folder = self.out / f"{stem} cases"
            folder.mkdir(exist_ok=True)
            images = self.images[label]
            numbers = rng.permutation(len(images)) + 1  # numbering says nothing about the patient
            for (data, patient_id, mask_rel), n in zip(images, numbers):
                rel = f"{stem} cases/{stem} case ({n}).jpg"
                (self.out / rel).write_bytes(data)
                rows.append({"path": rel, "label": label, "patient_id": patient_id, "mask_path": mask_rel, "n": n})
            self.image_counts[label] = len(images)
        rows.sort(key=lambda r: (CLASSES.index(r["label"]), r["n"]))
        for r in rows:
            del r["n"]
        write_csv(self.out / "manifest.csv", self.columns, rows)
        return "manifest.csv"


def _pick_slices(phantom: Phantom, rng: np.random.Generator) -> list[int]:
    """Slices to export: for a lesion patient every slice through a lesion plus two without; for
    a normal patient a similar number (5 to 10) of random slices."""
    n = phantom.hu.shape[0]
    has_lesion = phantom.mask.any(axis=(1, 2))
    if has_lesion.any():
        clear = np.flatnonzero(~has_lesion)
        extra: np.ndarray | list[int] = rng.choice(clear, size=min(2, len(clear)), replace=False) if len(clear) else []
        return sorted(np.flatnonzero(has_lesion).tolist() + [int(k) for k in extra])
    return sorted(rng.choice(n, size=min(n, int(rng.integers(5, 11))), replace=False).tolist())


def window_to_uint8(hu: np.ndarray, centre: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> 8-bit grey values of a display window (``(Y, X)`` float HU to uint8)."""
    lo = centre - width / 2
    return np.clip(np.rint((np.asarray(hu, float) - lo) / width * 255), 0, 255).astype(np.uint8)


def _encode_jpg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(img, np.uint8)).save(path, format="PNG")

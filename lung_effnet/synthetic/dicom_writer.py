"""Write real DICOM files from a CT volume: axial series, a localizer and a text SR.

Made for synthetic test data and demo archives (see :mod:`lung_effnet.synthetic.dataset`),
so the files look like a scanner's: CT Image Storage, one file per slice, patient / study / series
modules, real geometry (ImagePositionPatient / ImageOrientationPatient / PixelSpacing), rescale to
HU, optional lossless compression, and names that say nothing about slice order. Everything is
deterministic given ``rng``: UIDs come from :func:`pydicom.uid.generate_uid` with entropy drawn
from it, so the same seed writes byte-identical files.

Geometry: ``volume_hu[k]`` is written as an axial slice with ImageOrientationPatient
``[1, 0, 0, 0, 1, 0]`` (rows run to the patient's left, columns to posterior) and
ImagePositionPatient ``origin_lps + (0, 0, k * dz)``, so slice index increases towards superior.
That is the canonical orientation of :mod:`lung_effnet.io.volume`:
``affine_from_lps(origin_lps, (1, 0, 0), (0, 1, 0), (0, 0, 1), spacing) ==
canonical_affine(spacing, origin_lps)``.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

COMPRESSIONS: dict[str | None, tuple[str, str] | None] = {
    None: None,
    "jpeg2000": (JPEG2000Lossless, "pylibjpeg"),
    "jpegls": (JPEGLSLossless, "pyjpegls"),
    "rle": (RLELossless, "pydicom"),
}
"""``compression`` values: transfer syntax and pydicom encoding plugin (all lossless)."""

STORAGES = ("signed", "unsigned")
UNSIGNED_INTERCEPT = -1024.0


def write_dicom_series(
    volume_hu: np.ndarray,
    spacing,
    out_dir,
    *,
    patient_id: str,
    patient_name: str,
    rng: np.random.Generator,
    compression: str | None = None,
    storage: str = "signed",
    shuffle_names: bool = True,
    phi: dict | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    origin_lps=None,
    omit_instance_number: bool = False,
    shuffle_instance_number: bool = False,
) -> list[Path]:
    """Write a CT volume as an axial CT Image Storage series, one file per slice.

    Args:
        volume_hu: ``(Z, Y, X)`` HU in the canonical orientation (x left, y posterior,
            z superior); written rounded to integers.
        spacing: ``(dz, dy, dx)`` mm; dz is SliceThickness and SpacingBetweenSlices.
        out_dir: folder for the files (created).
        patient_id, patient_name: PatientID / PatientName.
        rng: source of every random choice (UIDs, dates, accession number, file names).
        compression: ``None`` (Explicit VR Little Endian), ``"jpeg2000"``, ``"jpegls"`` or
            ``"rle"`` (all lossless: the HU read back are exactly ``np.rint(volume_hu)``).
        storage: ``"signed"`` (int16, PixelRepresentation 1, intercept 0) or ``"unsigned"``
            (uint16, PixelRepresentation 0, intercept -1024, BitsStored 12 when values allow).
        shuffle_names: random hex file names (the file order says nothing about slice order);
            otherwise ``slice_0000.dcm``, ...
        phi: keyword -> value overriding any tag (for example canary PHI strings in tests).
        study_uid, series_uid: use these instead of generating them.
        origin_lps: ImagePositionPatient of slice 0; default: the volume centred on (0, 0, 0).
        omit_instance_number: leave InstanceNumber out.
        shuffle_instance_number: InstanceNumber is a random permutation of 1..Z, unrelated to
            position (a reader must order by ImagePositionPatient).

    Returns:
        The written paths, in slice order (index k is ``volume_hu[k]``).
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be (Z, Y, X), got shape {volume_hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values (dz, dy, dx), got {spacing}")
    n_slices, rows, cols = volume_hu.shape
    if origin_lps is None:
        origin_lps = tuple(-(n - 1) / 2 * s for n, s in zip((cols, rows, n_slices), spacing[::-1]))
    stored, pixel_module = _stored_pixels(volume_hu, storage)
    _check_compression(compression)

    token = rng.bytes(16).hex()
    study = _study_attributes(rng, patient_id, patient_name, token, study_uid)
    series_uid = series_uid or generate_uid(entropy_srcs=[token, "series"])
    names = _file_names(rng, n_slices, shuffle_names)
    instance_numbers = (rng.permutation(n_slices) + 1) if shuffle_instance_number else np.arange(1, n_slices + 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_slices):
        ds = _new_dataset(CTImageStorage, generate_uid(entropy_srcs=[token, "sop", str(k)]))
        _apply(ds, study)
        _apply(ds, _ct_series_attributes(series_uid, spacing, study))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ipp = [float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2]) + k * spacing[0]]
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = _ds(ipp[2])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
        if not omit_instance_number:
            ds.InstanceNumber = int(instance_numbers[k])
        _set_pixels(ds, stored[k], pixel_module, compression)
        _apply(ds, phi or {})
        paths.append(_write(ds, out_dir / names[k]))
    return paths


def write_localizer(
    volume_hu: np.ndarray,
    spacing,
    out_dir,
    *,
    patient_id: str,
    patient_name: str,
    rng: np.random.Generator,
    study_uid: str,
    phi: dict | None = None,
    origin_lps=None,
    file_name: str | None = None,
) -> Path:
    """Write a coronal localizer (scout) of the same patient and study, in its own series.

    The image is the mean attenuation through the volume front to back (a projection, like a
    scout), ``(Z, X)`` with superior at the top: ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``,
    ImageOrientationPatient ``[1, 0, 0, 0, 0, -1]``. A reader should skip it (it is not axial).
    """
    volume_hu = np.asarray(volume_hu, float)
    spacing = tuple(float(s) for s in spacing)
    n_slices, rows, cols = volume_hu.shape
    if origin_lps is None:
        origin_lps = tuple(-(n - 1) / 2 * s for n, s in zip((cols, rows, n_slices), spacing[::-1]))
    projection = np.clip(volume_hu, -1024, None).mean(axis=1)[::-1]  # (Z, X), superior first
    stored, pixel_module = _stored_pixels(projection[None], "signed")
    token = rng.bytes(16).hex()
    study = _study_attributes(rng, patient_id, patient_name, token, study_uid)
    ds = _new_dataset(CTImageStorage, generate_uid(entropy_srcs=[token, "localizer"]))
    _apply(ds, study)
    _apply(ds, _ct_series_attributes(generate_uid(entropy_srcs=[token, "loc-series"]), spacing, study))
    ds.SeriesNumber = 1
    ds.SeriesDescription = "TOPOGRAM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SliceThickness = "1"
    del ds.SpacingBetweenSlices
    top_z = origin_lps[2] + (n_slices - 1) * spacing[0]
    y_mid = origin_lps[1] + (rows - 1) / 2 * spacing[1]
    ds.ImagePositionPatient = [_ds(origin_lps[0]), _ds(y_mid), _ds(top_z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[2])]  # row spacing (z), column spacing (x)
    ds.InstanceNumber = 1
    _set_pixels(ds, stored[0], pixel_module, None)
    _apply(ds, phi or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(ds, out_dir / (file_name or _file_names(rng, 1, True)[0]))


def write_sr(
    out_dir,
    *,
    patient_id: str,
    patient_name: str,
    rng: np.random.Generator,
    study_uid: str,
    text: str = "Synthetic report. No clinical content.",
    phi: dict | None = None,
    file_name: str | None = None,
) -> Path:
    """Write a minimal Basic Text SR document (no pixel data) for the same patient and study."""
    token = rng.bytes(16).hex()
    study = _study_attributes(rng, patient_id, patient_name, token, study_uid)
    ds = _new_dataset(BasicTextSRStorage, generate_uid(entropy_srcs=[token, "sr"]))
    _apply(ds, study)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[token, "sr-series"])
    ds.SeriesNumber = 99
    ds.SeriesDescription = "REPORT"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    item.TextValue = text
    ds.ContentSequence = Sequence([item])
    _apply(ds, phi or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(ds, out_dir / (file_name or _file_names(rng, 1, True)[0]))


# --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """The most precise DS string (decimal string, at most 16 characters) for ``value``."""
    for digits in range(12, 0, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value!r} as a DICOM decimal string")


def _check_compression(compression):
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")


def _stored_pixels(volume_hu: np.ndarray, storage: str) -> tuple[np.ndarray, dict]:
    """Stored integers and the pixel-module values that map them back to HU."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    hu = np.rint(np.asarray(volume_hu, float))
    if storage == "signed":
        lo, hi = -(2**15), 2**15 - 1
        if hu.min() < lo or hu.max() > hi:
            raise ValueError(f"HU range [{hu.min()}, {hu.max()}] does not fit int16 storage")
        return hu.astype(np.int16), {"bits_stored": 16, "intercept": 0.0}
    stored = hu - UNSIGNED_INTERCEPT
    if stored.min() < 0 or stored.max() > 2**16 - 1:
        raise ValueError(f"HU range [{hu.min()}, {hu.max()}] does not fit unsigned storage with "
                         f"intercept {UNSIGNED_INTERCEPT:g} (HU >= -1024 needed)")
    bits = 12 if stored.max() < 2**12 else 16
    return stored.astype(np.uint16), {"bits_stored": bits, "intercept": UNSIGNED_INTERCEPT}


def _set_pixels(ds: Dataset, frame: np.ndarray, pixel_module: dict, compression) -> None:
    """Set Pixel Data and the Image Pixel / CT Image modules, compressing losslessly if asked."""
    ds.set_pixel_data(frame, "MONOCHROME2", pixel_module["bits_stored"], generate_instance_uid=False)
    ds.RescaleIntercept = _ds(pixel_module["intercept"])
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    codec = COMPRESSIONS[compression]
    if codec is not None:
        uid, plugin = codec
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)


def _new_dataset(sop_class: UID, sop_uid: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUNG_EFFNET_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _study_attributes(rng, patient_id, patient_name, token, study_uid) -> dict:
    """Patient, study and equipment attributes (PHI lives here; ``phi`` may override any)."""
    study_day = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 9 * 365)))
    birth = study_day - _dt.timedelta(days=int(rng.integers(35 * 365, 85 * 365)))
    study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    study_uid = study_uid or generate_uid(entropy_srcs=[token, "study"])
    return {
        "PatientName": patient_name, "PatientID": patient_id,
        "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": str(rng.choice(["F", "M"])),
        "StudyInstanceUID": study_uid, "StudyDate": study_day.strftime("%Y%m%d"),
        "StudyTime": study_time, "StudyID": str(int(rng.integers(1000, 9999))),
        "AccessionNumber": f"ACC{int(rng.integers(10**7, 10**8))}",
        "ReferringPhysicianName": "SYNTH^REFERRER", "InstitutionName": "Synthetic General Hospital",
        "StudyDescription": "CT THORAX", "Manufacturer": "lung-effnet synthetic",
        # one frame of reference per study: the localizer and the axial series share it
        "FrameOfReferenceUID": generate_uid(entropy_srcs=[str(study_uid), "frame-of-reference"]),
        "PositionReferenceIndicator": "",
    }


def _ct_series_attributes(series_uid, spacing, study) -> dict:
    return {
        "Modality": "CT", "SeriesInstanceUID": series_uid, "SeriesNumber": 2,
        "SeriesDescription": "CT CHEST", "SeriesDate": study["StudyDate"],
        "SeriesTime": study["StudyTime"], "ContentDate": study["StudyDate"],
        "ContentTime": study["StudyTime"], "AcquisitionNumber": 1, "BodyPartExamined": "CHEST",
        "PatientPosition": "HFS", "KVP": "120", "ConvolutionKernel": "B30f",
        "SliceThickness": _ds(spacing[0]), "SpacingBetweenSlices": _ds(spacing[0]),
    }


def _apply(ds: Dataset, values: dict) -> None:
    for keyword, value in values.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        if dictionary_VR(keyword) == "SQ" and not isinstance(value, Sequence):
            raise ValueError(f"{keyword} is a sequence; pass a pydicom Sequence")
        setattr(ds, keyword, value)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _file_names(rng, n: int, shuffle: bool) -> list[str]:
    if not shuffle:
        return [f"slice_{k:04d}.dcm" for k in range(n)]
    names: dict[str, None] = {}
    while len(names) < n:  # 64-bit random names: a repeat is practically impossible, but cheap to rule out
        names[rng.bytes(8).hex() + ".dcm"] = None
    return list(names)


def _write(ds: Dataset, path: Path) -> Path:
    dcmwrite(path, ds, enforce_file_format=True)
    return path

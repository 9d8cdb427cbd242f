"""``score --dicom-out``: each scored DICOM series' result as DICOM objects that a PACS files with its study.

Per scored DICOM series, in ``<dicom-out>/<series>/`` (``<series>`` is the series' name in
``predictions.csv``, made a safe file name: its Series Instance UID, or its pseudonym with
``--pseudonymize-uids``):

- ``SR.dcm``: a Comprehensive 3D SR following TID 1500 (Measurement Report), built with highdicom,
  in the source study (same Study Instance UID, the patient and study modules copied from the key
  slice's file) and a new series. One TID 1501 measurement group holds the predicted class as a
  qualitative evaluation (SNOMED CT Benign / Malignant / Normal), the three series probabilities
  as numeric measurements (unit ``1``), the model as the algorithm identification (name; version =
  package version and weights fingerprint; the aggregation rule and ``top_k`` as its parameters)
  and the key slice's SOP instance as the group's source image. The concept names "Predicted
  class" and "Probability of class ..." are codes of this project's private scheme
  ``99LUNGEFFNET``, identified in the SR (no standard code says either).
- ``SC.dcm`` (with ``--saliency``): the key slice's Grad-CAM overlay as a Secondary Capture image
  (RGB, ``BurnedInAnnotation`` YES: the class and "not for diagnosis" are drawn into the pixels), in
  the same new series, listed in the SR's image library. The picture is the model's input (lung
  crop, resized), not the source's pixel grid: it has no pixel spacing.

UIDs of the new series and objects are hashes of the source series UID, the model's fingerprint
and the content (``derived_uid``): a resumed or repeated run writes the same objects, which a PACS
takes as the same instances, not new ones.

Privacy: these files are the only outputs of ``score`` that carry patient tags (a PACS needs them
to file the result with the images). They go only under ``--dicom-out``, which must lie outside
``--out`` and ``--input``; what is recorded elsewhere about them (the resume records,
``summary.json``) is file names and counts, and an error is recorded by its exception type only
(a message could quote a tag value).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError
from lung_effnet.io.names import display_name, safe_file_name
from lung_effnet.io.privacy import uid_pseudonym

log = logging.getLogger(__name__)

PRIVATE_SCHEME = "99LUNGEFFNET"
"""Coding scheme of the concepts no standard scheme names (DICOM leaves "99" prefixes to private schemes)."""
SERIES_NUMBER = 7701
"""Series Number of the result series (a PACS lists series by number; this one sorts after the CT's)."""
MANUFACTURER = "lung-effnet"
NOT_FOR_DIAGNOSIS = "research use only, not for diagnosis"
SR_FILE, SC_FILE = "SR.dcm", "SC.dcm"
NOT_DICOM = {"nifti": "NIfTI volume: no DICOM study to file a result in",
             "images": "2D image: no DICOM study to file a result in"}
TYPE2_STUDY_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName")
"""Patient and study attributes a CT may leave out that highdicom reads: present but empty (Type 2) when absent."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The model as the SR identifies it: ``name`` (architecture and fold count), ``version``
    (package version and weights fingerprint), the aggregation ``rule`` and ``top_k``."""

    name: str
    version: str
    fingerprint: str
    rule: str
    top_k: int


def check_dicom_out_apart(dicom_out: str | Path, **folders: str | Path) -> Path:
    """``dicom_out`` resolved, or ``InputError`` when it is, holds or lies in one of ``folders``
    (``{"--input": ..., "--out": ...}``): the files there carry patient tags and stay apart from
    every other output and from the archive."""
    dicom_out = Path(dicom_out).resolve()
    for flag, folder in folders.items():
        folder = Path(folder).resolve()
        if dicom_out.is_relative_to(folder) or folder.is_relative_to(dicom_out):
            raise InputError(f"--dicom-out: {dicom_out} overlaps {flag} {folder}: the DICOM results carry patient "
                             f"tags and are kept apart from every other output; give a separate folder")
    return dicom_out


def derived_uid(*parts: str) -> str:
    """A ``2.25.<n>`` UID that is a keyed hash of ``parts`` (``io.privacy.uid_pseudonym`` with a
    fixed key): the same inputs give the same UID, and the UID tells nothing about them. (pydicom's
    ``generate_uid`` ignores its entropy sources under the 2.25 root and draws a random one.)"""
    return uid_pseudonym("\x00".join(parts), MANUFACTURER.encode())


def _code(name: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(name, PRIVATE_SCHEME, meaning)


def _probability_code(cls: str):
    return _code(f"p-{cls}", f"Probability of class {cls}")


def _class_code(cls: str):
    from pydicom.sr.codedict import codes

    return {"benign": codes.SCT.Benign, "malignant": codes.SCT.Malignant, "normal": codes.SCT.Normal}[cls]


def overlay_rgb(plane: np.ndarray, cam: np.ndarray, predicted: str, min_width: int = 384) -> np.ndarray:
    """The key slice with its Grad-CAM map blended in jet (alpha 0.45, as the HTML pages show it),
    enlarged by a whole factor to at least ``min_width`` px (pixels stay square and sharp), under a
    burned-in strip that names the class and says ``NOT_FOR_DIAGNOSIS``.

    Args:
        plane: ``(S, S)`` the slice as the model saw it, in [0, 1].
        cam: ``(S, S)`` saliency in [0, 1].

    Returns:
        ``(S * k + 28, S * k, 3)`` uint8 RGB, ``k = ceil(min_width / S)``.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grey = np.repeat(np.clip(plane, 0, 1)[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    rgb = (255 * (0.55 * grey + 0.45 * heat)).round().astype(np.uint8)
    scale = -(-min_width // rgb.shape[1])
    size = rgb.shape[1] * scale
    image = Image.fromarray(rgb).resize((size, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    strip = 28
    canvas = Image.new("RGB", (size, image.height + strip), (0, 0, 0))
    canvas.paste(image, (0, strip))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"lung-effnet Grad-CAM: {predicted}", fill=(255, 255, 255))
    draw.text((4, 14), NOT_FOR_DIAGNOSIS.upper(), fill=(255, 200, 0))
    return np.asarray(canvas)


def _source_dataset(path: Path):
    """The key slice's header (no pixels): the SR's evidence and the source of the patient and study modules."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for tag in TYPE2_STUDY_TAGS:
        if tag not in ds:
            setattr(ds, tag, "")
    return ds


class DicomResultWriter:
    """Writes ``SR.dcm`` (and ``SC.dcm``) of each scored DICOM series under ``out_dir`` (module docstring)."""

    def __init__(self, out_dir: Path, input_dir: Path, algorithm: Algorithm):
        self.out_dir, self.input_dir, self.algorithm = Path(out_dir), Path(input_dir), algorithm

    def write(self, entry: dict, overlay: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        """Write the objects of one scored series; returns their paths relative to ``out_dir``.

        Args:
            entry: the series' record (``outputs.make_record``): ``series_uid`` (as in predictions.csv),
                ``key_file`` (relative to ``--input``), ``probs``, ``predicted``.
            overlay: ``(plane, cam)`` of the key slice, each ``(S, S)`` in [0, 1], for ``SC.dcm``.
        """
        source = _source_dataset(self.input_dir / entry["key_file"])
        seed = (source.SeriesInstanceUID, self.algorithm.fingerprint, self.algorithm.rule, str(self.algorithm.top_k))
        series_uid = derived_uid(*seed, "series", str(overlay is not None))
        folder = self.out_dir / safe_file_name(entry["series_uid"])
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        sc = None
        if overlay is not None:
            sc = self._secondary_capture(source, overlay, entry["predicted"], series_uid, seed)
            written.append(self._save(sc, folder / SC_FILE))
        sr = self._report(source, entry, series_uid, seed, sc)
        written.append(self._save(sr, folder / SR_FILE))
        return written

    def _save(self, ds, path: Path) -> str:
        tmp = path.with_name(f".{path.name}.tmp")  # never a half file under the final name
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        return path.relative_to(self.out_dir).as_posix()

    def _secondary_capture(self, source, overlay, predicted: str, series_uid: str, seed: tuple):
        import highdicom as hd

        plane, cam = overlay
        rgb = overlay_rgb(plane, cam, predicted)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"),  # canonical planes: rows run left, columns posterior
            series_instance_uid=series_uid, series_number=SERIES_NUMBER,
            sop_instance_uid=derived_uid(*seed, "sc", hashlib.blake2b(rgb.tobytes()).hexdigest()), instance_number=2,
            manufacturer=MANUFACTURER, series_description=f"lung-effnet result ({NOT_FOR_DIAGNOSIS})")
        sc.BurnedInAnnotation = "YES"
        sc.ImageLaterality = "B"  # both lungs (paired): what makes the series' Laterality unnecessary
        sc.ImageComments = f"Grad-CAM overlay for '{predicted}' on the key slice, {NOT_FOR_DIAGNOSIS}"
        sc.DerivationDescription = ("lung-effnet Grad-CAM (jet, alpha 0.45) over the key slice as the model saw it "
                                    "(lung crop, resized); class and disclaimer burned in")
        sc.SourceImageSequence = [_image_reference(source)]
        return sc

    def _report(self, source, entry: dict, series_uid: str, seed: tuple, sc):
        import highdicom as hd
        from pydicom.sr.codedict import codes
        from pydicom.sr.coding import Code

        alg = self.algorithm
        algorithm_id = hd.sr.AlgorithmIdentification(
            name=alg.name, version=alg.version, parameters=[f"aggregation: {alg.rule}", f"top_k: {alg.top_k}"])
        key_slice = hd.sr.SourceImageForMeasurement.from_source_image(source)
        measurements = [hd.sr.Measurement(name=_probability_code(c), value=float(p), unit=codes.UCUM.NoUnits,
                                          algorithm_id=algorithm_id, referenced_images=[key_slice])
                        for c, p in zip(CLASSES, entry["probs"])]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(*seed, "tracking"),
                                                         identifier="lung-effnet series classification"),
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm_id, measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_code("class", "Predicted class"),
                                                                 value=_class_code(entry["predicted"]))],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derived_uid(alg.fingerprint, "device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
                model_name=alg.name))
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=Code("24627-2", "LN", "CT Chest"),
            imaging_measurements=[group],
            referenced_images=[sc] if sc is not None else None)
        content = [*entry["probs"], entry["predicted"], sc.SOPInstanceUID if sc is not None else ""]
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source, *([sc] if sc is not None else [])], content=report,
            series_instance_uid=series_uid, series_number=SERIES_NUMBER,
            sop_instance_uid=derived_uid(*seed, "sr", *map(str, content)), instance_number=1,
            manufacturer=MANUFACTURER, series_description=f"lung-effnet result ({NOT_FOR_DIAGNOSIS})",
            is_complete=True)
        sr.CodingSchemeIdentificationSequence = [_private_scheme()]
        return sr


def _private_scheme():
    """SOP Common's identification of ``PRIVATE_SCHEME``, which a reader needs to interpret its codes."""
    from pydicom.dataset import Dataset

    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "lung-effnet codes (class probabilities of its CT classifier)"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    return scheme


def _image_reference(source):
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return ref


def add_dicom_results(record: dict, writer: DicomResultWriter,
                      key_maps: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the DICOM results of a DICOM unit's scored series and note them in its ``record``
    (``dicom``: the files written; ``dicom_error``: why none were). A series whose objects cannot
    be built (say, its key slice's file has gone) is noted and the run goes on."""
    for entry in (e for e in record["items"] if "probs" in e):
        try:
            entry["dicom"] = writer.write(entry, key_maps.get(entry["series_uid"]))
        except Exception as exc:  # noqa: BLE001 - one series' result must not stop the archive
            entry["dicom_error"] = f"DICOM result not written ({type(exc).__name__})"
            log.warning("%s: %s", display_name(entry["path"]), entry["dicom_error"])


def dicom_summary(records: list[dict], dicom_dir: Path) -> dict:
    """``summary.json``'s ``dicom_out``: how many series got DICOM results and why the others did
    not (NIfTI and 2D sources have no study; a failed write names its exception type)."""
    written, files, not_written = 0, 0, Counter[str]()
    for item in (i for r in records for i in r["items"] if "probs" in i):
        if item.get("dicom"):
            written += 1
            files += len(item["dicom"])
        else:
            not_written[item.get("dicom_error") or NOT_DICOM.get(item["kind"], "not written")] += 1
    return {"dir": str(dicom_dir), "series_written": written, "files_written": files,
            "not_written": [{"reason": r, "series": n} for r, n in sorted(not_written.items())]}

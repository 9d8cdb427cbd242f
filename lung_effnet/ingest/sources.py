"""The ingest stage: a source of CT data in, the documented files out.

Sources (README.md, "Ingest your data"): a folder per class (IQ-OTH/NCCD layout), a manifest CSV, or a tree of
DICOM / NIfTI studies (and 2D images) with an optional labels CSV. Outputs in ``out_dir``:

- ``manifest.csv``: one row per usable, labelled sample (only when labels are known);
- ``series.csv``: one row per series, volume or image found;
- ``files.csv``: the ledger, one row per input file (``used`` / ``skipped`` / ``failed``);
- ``errors.csv``: ``path,stage,reason`` for every file not used;
- ``ingest.json``: counts and warnings (e.g. that the source has no patient ids);
- with ``write_nifti``: ``nifti/<series>.nii.gz`` per series, geometry from the DICOM tags.

One series is decoded at a time, so memory is bounded by the largest series.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError, MissingInputError
from lung_effnet.ingest.labels import LabelTable
from lung_effnet.ingest.manifest import (
    MaskCheck,
    drop_duplicate_content,
    mask_values_problem,
    normalize_label,
    read_manifest,
    validate_rows,
    write_manifest,
)
from lung_effnet.io.dicom_index import index_dicom_tree, record_walk_problems, relative_name, walk_files
from lung_effnet.io.dicom_series import load_series
from lung_effnet.io.images2d import is_image_2d, read_image_2d
from lung_effnet.io.ledger import Ledger, write_csv
from lung_effnet.io.names import safe_file_name, strip_volume_suffix
from lung_effnet.io.nifti import is_nifti, read_nifti
from lung_effnet.io.planes import read_sample_plane
from lung_effnet.io.privacy import UidPseudonyms, uid_note, warn_uid_like_paths
from lung_effnet.io.volume import Volume

log = logging.getLogger(__name__)

SERIES_COLUMNS = ("series_uid", "n_slices", "status", "label", "patient_id", "study_id",
                  "n_failed", "warnings", "nifti_path")
NO_PATIENT_IDS = (
    "NO PATIENT IDS: this source does not say which slices come from the same patient. Every slice "
    "is treated as its own patient, so slices of one patient can land in both training and test "
    "folds and cross-validated scores will be slice-level and optimistic (the flaw of the "
    "Lung-EffNet paper's 99.1%). Give a manifest CSV with patient_id to get an honest estimate."
)


@dataclass
class IngestResult:
    """What ingest found; ``rows`` is the validated manifest (empty without labels)."""

    kind: str
    has_labels: bool
    rows: list[dict] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        per_class: dict[str, dict[str, Any]] = {c: {"samples": 0, "patients": set()} for c in CLASSES}
        for row in self.rows:
            per_class[row["label"]]["samples"] += 1
            if row["patient_id"]:
                per_class[row["label"]]["patients"].add(row["patient_id"])
        reasons = Counter(
            (r["status"], r["reason"].split(": ")[0]) for r in self.ledger.rows.values() if r["status"] != "used"
        )
        return {
            "source_kind": self.kind,
            "labels_known": self.has_labels,
            "samples": len(self.rows),
            "per_class": {c: {"samples": v["samples"], "patients": len(v["patients"])} for c, v in per_class.items()},
            "patient_ids": "present" if any(r["patient_id"] for r in self.rows) else "missing",
            "series": len(self.series),
            "series_by_status": dict(Counter(s["status"] for s in self.series)),
            "files": self.ledger.counts(),
            "not_used_by_reason": [{"status": s, "reason": r, "files": n} for (s, r), n in reasons.most_common()],
            "warnings": self.warnings,
        }


def _digest(plane: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(plane, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def has_class_folders(root: Path) -> bool:
    """Whether ``root`` is a folder of class folders (``Bengin cases/``...); an unreadable ``root`` is an
    ``InputError`` naming it."""
    if not root.is_dir():
        return False
    try:
        return any(d.is_dir() and normalize_label(d.name) for d in root.iterdir())
    except OSError as exc:
        raise InputError(f"{root}: folder not readable: {(exc.strerror or type(exc).__name__).lower()}") from None


def _walk(root: Path, exclude: Path | None) -> tuple[list[Path], list]:
    """``walk_files(root)`` without what lies in ``exclude`` (the output folder when it is inside the
    source: a rerun does not read the previous run's outputs as inputs)."""
    files, problems = walk_files(root)
    if exclude is not None:
        skip = exclude.resolve()
        files = [f for f in files if not f.resolve().is_relative_to(skip)]
        problems = [p for p in problems if not p.path.is_relative_to(skip)]
    return files, problems


def ingest(source: str | Path, out_dir: str | Path, labels_csv: str | Path | None = None,
           write_nifti: bool = False, progress: bool = True, pseudonymize_uids: str | Path | None = None,
           exclude: str | Path | None = None) -> IngestResult:
    """Run the ingest stage and write its files (see module docstring).

    ``pseudonymize_uids``: a key file; every DICOM ``series_uid`` (whatever it looks like), every
    other ``series_uid`` (a relative path) that is shaped like a DICOM UID and every ``study_id`` in the
    outputs (and the NIfTI file names) becomes its keyed pseudonym (``io.privacy.UidPseudonyms``).
    ``exclude``: a folder left out of the walk (default ``out_dir``): outputs inside the source are not inputs.

    Raises:
        FileNotFoundError: ``source`` or ``labels_csv`` does not exist.
        ManifestError: a manifest or labels CSV that cannot be used at all (unreadable, not UTF-8...).
        InputError: ``source`` is a folder that cannot be listed.
    """
    source = Path(source)
    if not source.exists():
        raise MissingInputError(f"source not found: {source}")
    # Manifest paths are absolute (read_manifest resolves relative ones against the manifest's own
    # folder, so a path relative to the working directory would point nowhere when read back).
    source = source.resolve()
    out_dir = Path(out_dir)
    skip = Path(exclude if exclude is not None else out_dir)
    if source.is_dir():
        try:
            with os.scandir(source):
                pass
        except OSError as exc:
            raise InputError(f"{source}: folder not readable: {(exc.strerror or type(exc).__name__).lower()}") from None
    uids = UidPseudonyms.from_key_file(pseudonymize_uids) if pseudonymize_uids is not None else None
    if source.is_file() and source.suffix.lower() == ".csv":
        result = ingest_manifest_csv(source, progress)
    elif labels_csv is None and has_class_folders(source):
        result = ingest_class_folders(source, progress, skip)
    else:
        labels = LabelTable.from_csv(labels_csv) if labels_csv else None
        result = ingest_tree(source, labels, out_dir / "nifti" if write_nifti else None, progress, uids, skip)
    if result.has_labels and result.rows and not any(r["patient_id"] for r in result.rows):
        result.warnings.insert(0, NO_PATIENT_IDS)
    if uids is not None:
        for rows in (result.rows, result.series, result.ledger.rows.values()):
            uids.apply(rows)
        warn_uid_like_paths(result.ledger.rows)
    write_outputs(result, out_dir, uids)
    for warning in result.warnings:
        log.warning(warning)
    return result


def write_outputs(result: IngestResult, out_dir: Path, uids: UidPseudonyms | None = None) -> None:
    """``uids``: the pseudonyms the rows carry, noted in ``ingest.json`` (``privacy.uid_note``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.has_labels:
        write_manifest(out_dir / "manifest.csv", result.rows)
    write_csv(out_dir / "series.csv", SERIES_COLUMNS, result.series)
    result.ledger.write(out_dir)
    (out_dir / "ingest.json").write_text(json.dumps({**result.summary(), **uid_note(uids)}, indent=2) + "\n")


# --- a folder per class ----------------------------------------------------------------------

def ingest_class_folders(root: Path, progress: bool, exclude: Path | None = None) -> IngestResult:
    """IQ-OTH/NCCD layout: ``Bengin cases/``, ``Malignant cases/``, ``Normal cases/`` of images."""
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    result = IngestResult("class_folders", has_labels=True)
    ledger, rows = result.ledger, []
    rel = lambda p: relative_name(Path(p), root)  # noqa: E731
    files, problems = _walk(root, exclude)
    record_walk_problems(problems, root, ledger)
    for path in tqdm(files, desc="read images", unit="file", disable=not progress, leave=False):
        top = path.relative_to(root).parts
        label = normalize_label(top[0]) if len(top) > 1 else None
        if label is None:
            ledger.skipped(rel(path), "discover", "not inside a class folder (benign / malignant / normal)")
        elif not is_image_2d(path):
            ledger.skipped(rel(path), "discover", f"not an image file ({path.suffix or 'no suffix'})")
        else:
            rows.append(_image_row(path, label, "", ledger, rel))
    result.rows = validate_rows([r for r in rows if r], ledger, rel, content_hash=lambda r: r["_hash"])
    _mark_used(result, rel)
    result.series = [_image_series_row(r, rel) for r in result.rows]
    return result


def _image_row(path: Path, label: str, patient_id: str, ledger: Ledger, rel) -> dict | None:
    try:
        plane = read_image_2d(path)
    except Exception as exc:  # truncated or not really an image: one row, go on
        ledger.failed(rel(path), "decode", f"image not decodable: {type(exc).__name__}: {exc}"[:300])
        return None
    return {"path": str(path.resolve()), "label": label, "patient_id": patient_id,
            "series_uid": rel(path), "_hash": _digest(plane), "_shape": plane.shape}


def _image_series_row(row: dict, rel) -> dict:
    return {"series_uid": row.get("series_uid") or rel(row["path"]), "n_slices": 1, "status": "ok",
            "label": row["label"], "patient_id": row["patient_id"]}


def _mark_used(result: IngestResult, rel) -> None:
    for row in result.rows:
        result.ledger.used(rel(row["path"]), row.get("series_uid", ""))


# --- a manifest CSV ---------------------------------------------------------------------------

def ingest_manifest_csv(path: Path, progress: bool) -> IngestResult:
    """Validate a manifest CSV: every referenced sample is read once (decodable, hashed)."""
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    result = IngestResult("manifest_csv", has_labels=True)
    root = path.parent
    rel = lambda p: relative_name(Path(p), root)  # noqa: E731
    rows = validate_rows(read_manifest(path), result.ledger, rel)
    masks = MaskCheck(result.ledger, rel)  # a bad mask_path: an error row, the sample kept without it
    readable = []
    for row in tqdm(rows, desc="read samples", unit="slice", disable=not progress, leave=False):
        try:
            plane, _ = read_sample_plane(row["path"], row.get("slice_index"))
        except Exception as exc:  # one bad sample is one error row
            result.ledger.failed(rel(row["path"]), "decode", f"sample not readable: {type(exc).__name__}: {exc}"[:300])
            continue
        row["_hash"] = _digest(plane)
        masks.check(row, plane.shape)
        readable.append(row)
    result.rows = drop_duplicate_content(readable, result.ledger, rel, content_hash=lambda r: r["_hash"])
    # A file with one unreadable row is failed as a whole: its other rows are not trusted either.
    failed = {p for p, r in result.ledger.rows.items() if r["status"] != "used"}
    result.rows = [r for r in result.rows if rel(r["path"]) not in failed]
    _mark_used(result, rel)
    seen: dict[str, dict[str, Any]] = {}
    for row in result.rows:
        key = row.get("series_uid") or rel(row["path"])
        entry = seen.setdefault(key, {"series_uid": key, "n_slices": 0, "status": "ok", "label": row["label"],
                                      "patient_id": row["patient_id"], "study_id": row.get("study_id", "")})
        entry["n_slices"] += 1
    result.series = list(seen.values())
    return result


# --- a tree of DICOM / NIfTI / images ----------------------------------------------------------

def split_by_kind(files: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """``(NIfTI volumes, 2D images, the rest)`` by file name; the rest are DICOM candidates, for
    ``index_dicom_tree`` to read, group or skip with a reason. Order within each list is kept."""
    volumes: list[Path] = []
    images: list[Path] = []
    dicoms: list[Path] = []
    for path in files:
        (volumes if is_nifti(path) else images if is_image_2d(path) else dicoms).append(path)
    return volumes, images, dicoms


def ingest_tree(root: Path, labels: LabelTable | None, nifti_dir: Path | None, progress: bool,
                uids: UidPseudonyms | None = None, exclude: Path | None = None) -> IngestResult:
    """Walk a tree: DICOM series (grouped by SeriesInstanceUID), NIfTI volumes, 2D images."""
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    result = IngestResult("tree", has_labels=labels is not None)
    ledger = result.ledger
    rel = lambda p: relative_name(Path(p), root)  # noqa: E731
    files, problems = _walk(root, exclude)
    record_walk_problems(problems, root, ledger)
    masks = labels.mask_files() if labels else set()
    labels_file = str(labels.source.resolve()) if labels else ""
    others = []
    for path in files:
        resolved = str(path.resolve())
        if resolved in masks:
            ledger.used(rel(path))  # a lesion mask of a labelled series
        elif resolved == labels_file:
            ledger.used(rel(path))
        else:
            others.append(path)
    volumes, images, dicoms = split_by_kind(others)
    series = index_dicom_tree(root, ledger, files=dicoms, progress=progress)
    # Series UIDs read from DICOM headers (the walk writes none): pseudonymized whatever they look like.
    header_uids = {r["series_uid"] for r in ledger.rows.values() if r["series_uid"]}
    builder = _TreeBuilder(root, labels, nifti_dir, result, rel, uids)
    for entry in tqdm(list(series.values()), desc="read series", unit="series", disable=not progress, leave=False):
        builder.add_dicom_series(entry)
    for path in tqdm(volumes, desc="read NIfTI", unit="volume", disable=not progress, leave=False):
        builder.add_nifti(path)
    for path in images:
        builder.add_image(path)
    if uids is not None:
        for row in ledger.rows.values():
            if row["series_uid"] in header_uids:
                row["series_uid"] = uids.identifier(row["series_uid"])
    if labels is not None:
        result.rows = validate_rows(result.rows, ledger, rel, content_hash=lambda r: r["_hash"])
        unmatched = labels.unmatched_lines()
        if unmatched:
            result.warnings.append(f"{len(unmatched)} row(s) of {labels.source.name} matched no series "
                                   f"(lines {', '.join(map(str, unmatched[:10]))}{'...' if len(unmatched) > 10 else ''})")
    return result


class _TreeBuilder:
    """Turns each series / volume / image of a tree into a series row and manifest rows."""

    def __init__(self, root, labels, nifti_dir, result, rel, uids: UidPseudonyms | None = None):
        self.root, self.labels, self.nifti_dir, self.result, self.rel = root, labels, nifti_dir, result, rel
        self.uids = uids  # applied as series rows are made: no NIfTI file is named after a UID

    def add_dicom_series(self, entry) -> None:
        volume = load_series(entry, self.result.ledger)
        info = self._label(series_uid=entry.series_uid, study_uid=entry.study_uid, patient_id=entry.patient_id)
        series_uid, study_uid = entry.series_uid, entry.study_uid
        if self.uids is not None:  # both read from DICOM headers: pseudonymized whatever they look like
            series_uid, study_uid = self.uids.identifier(series_uid), self.uids.identifier(study_uid)
        row = {"series_uid": series_uid, "patient_id": entry.patient_id, "study_id": study_uid,
               "n_failed": sum(1 for s in entry.slices if self.result.ledger.rows[s.rel]["status"] != "used")
               + len(entry.dropped)}
        if volume is None:
            self.result.series.append({**row, "n_slices": 0, "status": "failed", "label": info.get("label", "")})
            return
        paths = [str(self.root / f) for f in volume.source_files]
        self._add_volume(volume, row, info, paths, [s.rel for s in entry.slices])

    def add_nifti(self, path: Path) -> None:
        rel = self.rel(path)
        try:
            volume = read_nifti(path, series_uid=rel)
        except Exception as exc:  # not a readable 3D NIfTI: one error row
            self.result.ledger.failed(rel, "decode", f"NIfTI not readable: {type(exc).__name__}: {exc}"[:300])
            self.result.series.append({"series_uid": rel, "n_slices": 0, "status": "failed"})
            return
        info = self._label(path=str(path))
        row = {"series_uid": rel, "patient_id": info.get("patient_id", ""), "n_failed": 0}
        self.result.ledger.used(rel, rel)
        self._add_volume(volume, row, info, [str(path.resolve())] * volume.n_slices, [rel])

    def add_image(self, path: Path) -> None:
        rel = self.rel(path)
        info = self._label(path=str(path))
        if self.labels is not None and not info:
            self.result.ledger.skipped(rel, "label", "no label for this image in the labels CSV")
            return
        row = _image_row(path, info.get("label", ""), info.get("patient_id", ""), self.result.ledger, self.rel)
        if row is None:
            self.result.series.append({"series_uid": rel, "n_slices": 0, "status": "failed"})
            return
        self.result.ledger.used(rel, rel)
        self.result.series.append(_image_series_row(row, self.rel))
        if self.labels is not None:
            self.result.rows.append(row)

    def _label(self, **keys) -> dict:
        return (self.labels.lookup(**keys) or {}) if self.labels is not None else {}

    def _add_volume(self, volume: Volume, row: dict, info: dict, slice_paths: list[str], files: list[str]) -> None:
        status = "incomplete" if volume.warnings else "ok"
        row.update(n_slices=volume.n_slices, status=status, label=info.get("label", ""),
                   warnings="; ".join(volume.warnings))
        if self.nifti_dir is not None:
            # bounded, one per series; the source's own .nii.gz / .dcm left out of the readable part
            name = safe_file_name(row["series_uid"], ".nii.gz", readable=strip_volume_suffix(row["series_uid"]))
            volume.to_nifti(self.nifti_dir / name)
            row["nifti_path"] = f"nifti/{name}"
        self.result.series.append(row)
        if self.labels is None:
            return
        if not info:
            for f in files:
                if self.result.ledger.rows[f]["status"] == "used":
                    self.result.ledger.skipped(f, "label", "no label for this series in the labels CSV", row["series_uid"])
            return
        mask_path = self._checked_mask(info.get("mask_path", ""), volume, row)
        for k in range(volume.n_slices):
            self.result.rows.append({
                "path": slice_paths[k], "label": info["label"], "patient_id": row["patient_id"],
                "study_id": row.get("study_id", ""), "series_uid": row["series_uid"], "slice_index": k,
                "mask_path": mask_path, "_hash": _digest(volume.hu[k]),
            })

    def _checked_mask(self, mask_path: str, volume: Volume, row: dict) -> str:
        """A mask is kept only if it reads, has the series' shape (same geometry) and is binary; else
        the series is used without it (``manifest.MaskCheck``)."""
        if not mask_path:
            return ""
        name = self.rel(mask_path)
        try:
            mask = read_nifti(mask_path)
        except Exception as exc:
            self.result.ledger.failed(name, "mask", f"mask not readable: {type(exc).__name__}: {exc}"[:300])
            return ""
        if mask.hu.shape != volume.hu.shape:
            self.result.ledger.failed(name, "mask", f"mask shape {mask.hu.shape} differs from its series {volume.hu.shape}", row["series_uid"])
            return ""
        if (problem := mask_values_problem(mask.hu, name)) is not None:
            self.result.ledger.failed(name, "mask", problem, row["series_uid"])
            return ""
        self.result.ledger.used(name, row["series_uid"])
        return str(Path(mask_path).resolve())


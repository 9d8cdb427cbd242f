"""The manifest: one row per sample (a 2D slice), the contract between ingest and training.

Columns: ``path,label,patient_id`` and the optional ``study_id,series_uid,slice_index,mask_path``.

- ``path``: the file that holds the slice (a 2D image, one DICOM slice, or a NIfTI volume); written
  absolute by ``ingest``; relative paths are read relative to the manifest's folder.
- ``label``: ``benign``, ``malignant`` or ``normal`` (case-insensitive; IQ-OTH/NCCD's ``Bengin`` too).
- ``patient_id``: a keyed pseudonym (``P-`` + 16 hex digits, see ``privacy``), or empty when the
  source has no patient ids (then every row is its own group and CV estimates are slice-level).
- ``slice_index``: for volumes and DICOM series, the slice's index in the canonical (z up) order of
  its series; empty for 2D images. ``mask_path`` is a lesion mask with the same geometry: a 2D image
  of the slice's size, or a NIfTI volume whose slice ``slice_index`` (0 for a 2D sample) has the
  slice's size; values 0 / 1, 0 / 255 or boolean (a JPEG-saved 0 / 255 mask is read thresholded at
  128, ``io.masks``). Ingest checks each one (``MaskCheck``).
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import ManifestError
from lung_effnet.io import masks
from lung_effnet.io.images2d import is_image_2d
from lung_effnet.io.ledger import Ledger, csv_value, write_csv
from lung_effnet.io.nifti import read_nifti
from lung_effnet.io.privacy import pseudonym

REQUIRED_COLUMNS = ("path", "label", "patient_id")
OPTIONAL_COLUMNS = ("study_id", "series_uid", "slice_index", "mask_path")
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

LABEL_SPELLINGS = {"benign": "benign", "bengin": "benign", "malignant": "malignant", "normal": "normal"}
_PSEUDONYM = re.compile(r"^P-[0-9a-f]{16}$")
_CASE_SUFFIX = re.compile(r"[\s_-]*cases?$", re.IGNORECASE)


def normalize_label(text: str) -> str | None:
    """``'Bengin cases'`` -> ``'benign'``; ``'MALIGNANT'`` -> ``'malignant'``; unknown -> ``None``."""
    key = _CASE_SUFFIX.sub("", str(text).strip()).lower()
    return LABEL_SPELLINGS.get(key)


def pseudonymize_patient(raw: str) -> str:
    """Patient ids from user files become keyed pseudonyms; ones we wrote already stay as they are."""
    raw = str(raw or "").strip()
    return raw if _PSEUDONYM.match(raw) else pseudonym(raw)


def read_table(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Read a CSV into dicts with stripped cells; stop with one line if a column is missing. Cells
    that ``write_csv`` protected from spreadsheets (``'=...``) read back as written (``io.ledger.csv_value``)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:  # no read permission, an I/O error: one line naming the file and the reason
        raise ManifestError(f"{path}: not readable: {(exc.strerror or type(exc).__name__).lower()}") from None
    text = _decoded_text(path, data)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        return [{k.strip(): csv_value((v or "").strip()) for k, v in row.items() if k} for row in reader]
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a CSV text file ({exc}); save it as CSV UTF-8") from None


def _decoded_text(path: Path, data: bytes) -> str:
    """``data`` as UTF-8 text (a UTF-8 byte-order mark dropped); a file in another encoding is one
    ``ManifestError`` that says which, so the message is never a column list of NUL bytes."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ManifestError(f"{path}: not UTF-8 text (UTF-16, by its byte-order mark); save it as CSV UTF-8")
    if b"\x00" in data[:4096]:  # ASCII in UTF-16 without a byte-order mark is every other byte NUL
        raise ManifestError(f"{path}: not UTF-8 text (NUL bytes: UTF-16 (no byte-order mark)? or not text at all); "
                            "save it as CSV UTF-8")
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:  # Latin-1, Windows-1252...
        position = bom + exc.start
        line = data.count(b"\n", 0, position) + 1
        raise ManifestError(f"{path}: not UTF-8 text (byte 0x{data[position]:02x} at position {position}, line {line}; "
                            "Latin-1 or Windows-1252?): save it as CSV UTF-8") from None


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest CSV: paths resolved against the manifest's folder, labels normalised,
    patient ids pseudonymised. Rows are not validated here (see ``validate_rows``)."""
    path = Path(path)
    rows = read_table(path, REQUIRED_COLUMNS)
    for row in rows:
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else (path.parent / p))
        if row.get("mask_path"):
            m = Path(row["mask_path"])
            row["mask_path"] = str(m if m.is_absolute() else (path.parent / m))
        row["label"] = normalize_label(row["label"]) or row["label"]
        row["patient_id"] = pseudonymize_patient(row.get("patient_id", ""))
    return rows


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    return write_csv(path, MANIFEST_COLUMNS, rows)


def mask_values_problem(mask: np.ndarray, name: str = "") -> str | None:
    """Why ``mask`` is not a usable lesion mask, or ``None``: ``io.masks.mask_values_problem`` (binary,
    or near-binary 8-bit as JPEG saves a 0 / 255 mask, read with the threshold training uses). A label
    map (1, 2, 3...), a grey image or a NaN is refused rather than thresholded."""
    return masks.mask_values_problem(mask, name)


class MaskCheck:
    """Checks the lesion mask (``mask_path``) of manifest rows against their samples, reading each
    mask file once.

    A mask that cannot be used (not readable as an image or NIfTI volume, another size than its
    slice, a slice index it lacks, values that are not binary) becomes a ``failed`` ledger row for
    the mask file (stage ``mask``, with the reason) and the sample is kept *without* a mask: the
    image and its label are still good, and training then simply leaves the sample out of the
    lesion loss (``training.lesion_loss``). The mask file itself gets no ``used`` row here.
    """

    def __init__(self, ledger: Ledger, rel):
        self.ledger, self.rel = ledger, rel
        self._files: dict[str, tuple[tuple[int, ...], str | None]] = {}  # path -> (shape, problem of the file)

    def check(self, row: dict, plane_shape: tuple[int, ...]) -> None:
        """Clear ``row["mask_path"]`` (and record why) when it does not fit ``plane_shape``, the ``(H, W)``
        of the row's sample."""
        path = row.get("mask_path") or ""
        if not path:
            return
        problem = self.problem(path, row.get("slice_index"), tuple(plane_shape))
        if problem:
            sample = self.rel(row["path"])
            self.ledger.failed(self.rel(path), "mask", f"{problem} (for {sample}): the sample is used without a mask"[:400],
                               row.get("series_uid", ""))
            row["mask_path"] = ""

    def problem(self, path: str, slice_index, plane_shape: tuple[int, ...]) -> str | None:
        shape, problem = self._file(path)
        if problem:
            return problem
        if len(shape) == 2:
            return None if shape == plane_shape else f"mask size {_size(shape)} differs from its image's {_size(plane_shape)}"
        k = int(slice_index) if str(slice_index or "").strip() else 0
        if not 0 <= k < shape[0]:
            return f"mask has no slice {k} (it has {shape[0]})"
        return None if shape[1:] == plane_shape else f"mask slice size {_size(shape[1:])} differs from its image's {_size(plane_shape)}"

    def _file(self, path: str) -> tuple[tuple[int, ...], str | None]:
        if path not in self._files:
            self._files[path] = _read_mask_file(path)
        return self._files[path]


def _size(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _read_mask_file(path: str) -> tuple[tuple[int, ...], str | None]:
    """``(shape, problem)`` of a mask file: ``(H, W)`` for a 2D image, ``(Z, Y, X)`` for a NIfTI volume."""
    if not Path(path).is_file():
        return (), "mask file not found"
    try:
        mask = masks.read_mask_image(path) if is_image_2d(path) else read_nifti(path).hu
    except Exception as exc:  # not an image nor a NIfTI volume (a text file, a truncated file): one reason
        kind = "an image" if is_image_2d(path) else "a NIfTI volume"
        return (), f"mask not readable as {kind}: {type(exc).__name__}: {exc}"[:300]
    return mask.shape, mask_values_problem(mask, Path(path).name)


def validate_rows(rows: list[dict], ledger: Ledger, rel, content_hash=None) -> list[dict]:
    """Drop the rows that cannot be trusted, each with an error row saying why.

    Checks, in order: unknown label; missing file; one patient with two labels (all of that
    patient's rows are dropped: the label is ambiguous); the same pixels under two sources (the
    later copies are dropped: a copy in two folds is leakage).

    Args:
        rows: manifest rows (``path`` absolute).
        ledger: receives a ``failed`` row (stage ``validate``) per dropped file.
        rel: function mapping a path to its name in outputs.
        content_hash: optional function row -> hex digest of the sample's pixels (or ``None``).
    """
    kept = []
    for row in rows:
        if row["label"] not in CLASSES:
            ledger.failed(rel(row["path"]), "validate", f"unknown label {row['label']!r}: expected one of {', '.join(CLASSES)}")
        elif not Path(row["path"]).is_file():
            ledger.failed(rel(row["path"]), "validate", "file not found")
        else:
            kept.append(row)
    labels_of = defaultdict(set)
    for row in kept:
        if row["patient_id"]:
            labels_of[row["patient_id"]].add(row["label"])
    conflicted = {p for p, labels in labels_of.items() if len(labels) > 1}
    for row in kept:
        if row["patient_id"] in conflicted:
            ledger.failed(rel(row["path"]), "validate",
                          f"patient {row['patient_id']} has several labels ({', '.join(sorted(labels_of[row['patient_id']]))})")
    kept = [r for r in kept if r["patient_id"] not in conflicted]
    return drop_duplicate_content(kept, ledger, rel, content_hash) if content_hash else kept


def drop_duplicate_content(rows: list[dict], ledger: Ledger, rel, content_hash) -> list[dict]:
    """Keep the first sample of each pixel content; a later one from another source is dropped."""
    first_seen: dict[str, dict] = {}
    kept = []
    for row in rows:
        digest = content_hash(row)
        first = first_seen.get(digest) if digest else None
        source = (row.get("series_uid") or row["path"])
        if first is not None and (first.get("series_uid") or first["path"]) != source:
            ledger.failed(rel(row["path"]), "validate", f"identical pixels to {rel(first['path'])}")
            continue
        if digest:
            first_seen.setdefault(digest, row)
        kept.append(row)
    return kept

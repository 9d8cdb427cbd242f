"""The manifest: one row per sample (a 2D slice), the contract between ingest and training.

Columns: ``path,label,patient_id`` and the optional ``study_id,series_uid,slice_index,mask_path``.

- ``path``: the file that holds the slice (a 2D image, one DICOM slice, or a NIfTI volume); written
  absolute by ``ingest``; relative paths are read relative to the manifest's folder.
- ``label``: ``benign``, ``malignant`` or ``normal`` (case-insensitive; IQ-OTH/NCCD's ``Bengin`` too).
- ``patient_id``: a keyed pseudonym (``P-`` + 16 hex digits, see ``privacy``), or empty when the
  source has no patient ids (then every row is its own group and CV estimates are slice-level).
- ``slice_index``: for volumes and DICOM series, the slice's index in the canonical (z up) order of
  its series; empty for 2D images. ``mask_path`` is a lesion mask with the same geometry.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

from lung_effnet.classes import CLASSES
from lung_effnet.errors import ManifestError
from lung_effnet.io.ledger import Ledger, write_csv
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
    """Read a CSV into dicts with stripped cells; stop with one line if a column is missing."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]


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

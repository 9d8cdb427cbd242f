"""Labels CSV for a tree of DICOM / NIfTI studies: which label each series, study or patient has.

Columns: ``label`` plus one key column, looked for in this order: ``series_uid``
(SeriesInstanceUID), ``path`` (a volume or image file relative to the labels file, for NIfTI and
2D images), ``study_id`` (StudyInstanceUID), ``patient_id`` (the DICOM PatientID as the scanner
wrote it; it is replaced by its keyed pseudonym on reading and never written anywhere).
Optional: ``patient_id`` beside another key (grouping for NIfTI / images), and ``mask_path``
(a NIfTI lesion mask with the geometry of the series, relative to the labels file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lung_effnet.classes import CLASSES
from lung_effnet.errors import ManifestError
from lung_effnet.ingest.manifest import normalize_label, pseudonymize_patient, read_table

KEY_COLUMNS = ("series_uid", "path", "study_id", "patient_id")


@dataclass
class LabelTable:
    """Label lookup keyed by one column; remembers which entries matched something."""

    key: str
    entries: dict[str, dict]
    source: Path
    matched: set = field(default_factory=set)

    @classmethod
    def from_csv(cls, path: str | Path) -> "LabelTable":
        path = Path(path)
        rows = read_table(path, ("label",))
        if not rows:
            raise ManifestError(f"{path}: no rows")
        key = next((k for k in KEY_COLUMNS if k in rows[0]), None)
        if key is None:
            raise ManifestError(f"{path}: needs a key column, one of {', '.join(KEY_COLUMNS)}")
        entries = {}
        for n, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
            label = normalize_label(row["label"])
            if label is None:
                raise ManifestError(f"{path}, line {n}: unknown label {row['label']!r}; expected one of {', '.join(CLASSES)}")
            value = row[key]
            if key == "patient_id":
                value = pseudonymize_patient(value)
            elif key == "path":
                value = (path.parent / value).resolve().as_posix()
            mask = row.get("mask_path", "")
            entries[value] = {
                "label": label,
                "patient_id": pseudonymize_patient(row.get("patient_id", "")),
                "mask_path": str((path.parent / mask).resolve()) if mask else "",
                "line": n,
            }
        return cls(key, entries, path)

    def mask_files(self) -> set[str]:
        return {e["mask_path"] for e in self.entries.values() if e["mask_path"]}

    def lookup(self, *, series_uid="", path="", study_uid="", patient_id="") -> dict | None:
        """The entry for a series / file, or ``None``. ``path`` is absolute."""
        value = {"series_uid": series_uid, "study_id": study_uid, "patient_id": patient_id,
                 "path": Path(path).resolve().as_posix() if path else ""}[self.key]
        entry = self.entries.get(value) if value else None
        if entry is not None:
            self.matched.add(value)
        return entry

    def unmatched_lines(self) -> list[int]:
        return sorted(e["line"] for k, e in self.entries.items() if k not in self.matched)

"""Accounting for every input file: the ledger (``files.csv``) and the error rows (``errors.csv``).

The contract: input files = ledger rows. Each file ends ``used``, ``skipped`` (readable but not
wanted: a localizer, an SR, an MR series) or ``failed`` (truncated, undecodable). Every file that is
not ``used`` also has one row in ``errors.csv`` saying at which stage and why.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

USED, SKIPPED, FAILED = "used", "skipped", "failed"

LEDGER_COLUMNS = ("path", "series_uid", "status", "reason")
ERROR_COLUMNS = ("path", "stage", "reason")


@dataclass
class Ledger:
    """One status per input file, keyed by its path as written in the outputs.

    The last call for a path wins, so a file first indexed as ``used`` can later be marked
    ``failed`` when its pixels do not decode.
    """

    rows: dict[str, dict] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)

    def used(self, path: str, series_uid: str = "") -> None:
        self.rows[path] = {"path": path, "series_uid": series_uid, "status": USED, "reason": ""}
        self.stages.pop(path, None)

    def skipped(self, path: str, stage: str, reason: str, series_uid: str = "") -> None:
        self._not_used(path, SKIPPED, stage, reason, series_uid)

    def failed(self, path: str, stage: str, reason: str, series_uid: str = "") -> None:
        self._not_used(path, FAILED, stage, reason, series_uid)

    def _not_used(self, path, status, stage, reason, series_uid) -> None:
        self.rows[path] = {"path": path, "series_uid": series_uid, "status": status, "reason": reason}
        self.stages[path] = stage

    def error_rows(self) -> list[dict]:
        """One ``path,stage,reason`` row per file that is not used."""
        return [
            {"path": p, "stage": self.stages[p], "reason": r["reason"]}
            for p, r in self.rows.items()
            if r["status"] != USED
        ]

    def counts(self) -> dict[str, int]:
        out = {USED: 0, SKIPPED: 0, FAILED: 0}
        for r in self.rows.values():
            out[r["status"]] += 1
        return out

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``files.csv`` and ``errors.csv`` (sorted by path, so reruns give identical files)."""
        out_dir = Path(out_dir)
        files = write_csv(out_dir / "files.csv", LEDGER_COLUMNS, sorted(self.rows.values(), key=_by_path))
        errors = write_csv(out_dir / "errors.csv", ERROR_COLUMNS, sorted(self.error_rows(), key=_by_path))
        return files, errors


def _by_path(row: dict) -> str:
    return row["path"]


def write_csv(path: str | Path, columns, rows) -> Path:
    """Write rows (dicts) with a fixed header; missing keys become empty cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return path

"""Accounting for every input file: the ledger (``files.csv``) and the error rows (``errors.csv``).

The contract: input files = ledger rows. Each file ends ``used``, ``skipped`` (readable but not
wanted: a localizer, an SR, an MR series) or ``failed`` (truncated, undecodable). Every file that is
not ``used`` also has one row in ``errors.csv`` saying at which stage and why.

Every CSV the package writes goes through ``write_csv``, which keeps spreadsheets from running a
cell as a formula (``spreadsheet_safe``); the package's readers of CSV files (``read_csv_rows``)
undo that, so a file named ``=1+1.png`` reads back as itself.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from lung_effnet.io.names import display_name

USED, SKIPPED, FAILED = "used", "skipped", "failed"

LEDGER_COLUMNS = ("path", "series_uid", "status", "reason")
ERROR_COLUMNS = ("path", "stage", "reason")

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make Excel, LibreOffice or Google Sheets read a cell as a formula (OWASP,
"CSV Injection"): a file named ``=HYPERLINK(...).png`` must not become a live link in a report."""
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Ledger:
    """One status per input file, keyed by its path as found (relative to the input; undecodable bytes
    as surrogates): ``write`` shows it as ``io.names.display_name`` does, one name per key.

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
        shown = lambda rows: sorted(({**r, "path": display_name(r["path"])} for r in rows), key=_by_path)  # noqa: E731
        files = write_csv(out_dir / "files.csv", LEDGER_COLUMNS, shown(self.rows.values()))
        errors = write_csv(out_dir / "errors.csv", ERROR_COLUMNS, shown(self.error_rows()))
        return files, errors


def _by_path(row: dict) -> str:
    return row["path"]


def _needs_quote(text: str) -> bool:
    if text.startswith("'"):  # already looks escaped: escape once more, so that reading back is exact
        return _needs_quote(text[1:])
    return text.startswith(FORMULA_STARTS) and not _NUMBER.match(text)


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that no spreadsheet runs: text starting with ``= + - @``, a tab or a carriage
    return gets a leading ``'`` (OWASP's advice; spreadsheets show the text, without the quote).
    Numbers, and text that is a plain number (``-0.5``, ``-1000``, ``1e-3``), are left as they
    are; so is text already starting with ``'`` unless it would read back as another value, in
    which case it gets one more ``'`` (``csv_value`` strips exactly one)."""
    if isinstance(value, str) and _needs_quote(value):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The value ``spreadsheet_safe`` wrote as ``cell`` (the inverse: one leading ``'`` removed
    where it was added); any other cell is returned unchanged."""
    return cell[1:] if cell.startswith("'") and _needs_quote(cell[1:]) else cell


def write_csv(path: str | Path, columns, rows) -> Path:
    """Write rows (dicts) with a fixed header; missing keys become empty cells, text cells are made
    ``spreadsheet_safe``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else spreadsheet_safe(row.get(c))) for c in columns})
    return path


def read_csv_rows(path: str | Path, encoding: str = "utf-8") -> list[dict]:
    """Read a CSV as dicts, each cell through ``csv_value`` (so files of ``write_csv`` read back exact)."""
    with open(path, newline="", encoding=encoding) as fh:
        return [{k: csv_value(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(fh)]

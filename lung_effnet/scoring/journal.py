"""Resume records: one small JSON file per finished unit, written atomically.

``<out>/parts/<digest of the unit key>.json`` holds everything the final files need about a unit
(its series rows, slice probabilities, ledger rows). It is written to a temporary file, fsynced
and renamed, so after a SIGKILL at any moment a record is either whole or absent; a rerun skips
the units that have one and rebuilds the final files from all records (``outputs``). Float values
go through JSON's exact round trip, so resumed and uninterrupted runs give identical files.

``<out>/parts/run.json`` names the model and the settings that change results; a rerun with
another model or rule into the same ``--out`` is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lung_effnet.errors import OutputMismatchError
from lung_effnet.io.shared_files import write_atomic  # noqa: F401 - also the scoring modules' import of it
from lung_effnet.scoring.discover import ScoreUnit

RECORD_VERSION = 1


def record_path(parts_dir: Path, key: str) -> Path:
    """Where the record of the unit ``key`` lives: ``<parts>/<blake2b digest of key>.json``."""
    return Path(parts_dir) / (hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".json")


def read_record(parts_dir: Path, key: str, files: list[str]) -> dict | None:
    """The record of unit ``key`` under ``parts_dir`` (``score --shard`` outputs are merged from these),
    or ``None`` when absent, unreadable, of another version or made from other ``files``."""
    try:
        record = json.loads(record_path(parts_dir, key).read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != RECORD_VERSION or record.get("key") != key or record.get("files") != files:
        return None
    return record


class Journal:
    """The resume records of one output folder."""

    def __init__(self, out_dir: str | Path, settings: dict):
        self.dir = Path(out_dir) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / "run.json"
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise OutputMismatchError(
                    f"{out_dir} holds results of a run with other settings ({', '.join(changed)}); "
                    "use another --out, or delete it to start over")
        else:
            write_atomic(run_file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        for stale in self.dir.glob(".*.tmp"):  # left by a kill during a write: never a record
            stale.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return record_path(self.dir, key)

    def load(self, unit: ScoreUnit) -> dict | None:
        """The record of a unit, or ``None`` when absent, unreadable or made from other files."""
        return read_record(self.dir, unit.key, unit.files)

    def save(self, record: dict) -> None:
        write_atomic(self.path(record["key"]), json.dumps({"version": RECORD_VERSION, **record}) + "\n")

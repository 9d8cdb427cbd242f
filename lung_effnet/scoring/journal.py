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
import os
import tempfile
from pathlib import Path

from lung_effnet.errors import OutputMismatchError
from lung_effnet.scoring.discover import ScoreUnit

RECORD_VERSION = 1


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the whole new one, even on power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        return self.dir / (hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".json")

    def load(self, unit: ScoreUnit) -> dict | None:
        """The record of a unit, or ``None`` when absent, unreadable or made from other files."""
        try:
            record = json.loads(self.path(unit.key).read_text())
        except (OSError, ValueError):
            return None
        if record.get("version") != RECORD_VERSION or record.get("key") != unit.key or record.get("files") != unit.files:
            return None
        return record

    def save(self, record: dict) -> None:
        write_atomic(self.path(record["key"]), json.dumps({"version": RECORD_VERSION, **record}) + "\n")

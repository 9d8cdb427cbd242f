"""What a model was trained on, so that ``score`` can say when it is shown its own training data.

Scoring a model's own training series gives near-perfect figures that say nothing about new
patients (the demo's archive scores 60/60 beside an out-of-fold AUROC of 0.8). ``train`` writes
``model/training_data.json``:

- ``series``: a digest of each training DICOM series' Series Instance UID (as found in the headers);
- ``files``: a digest of the bytes of each training source file (NIfTI volumes, 2D images, DICOM
  slices), the one the preprocessing cache already computes (``preprocess.cache.file_digest``).

Digests are unkeyed blake2b: whoever holds a series or a file can test whether the model was
trained on it (the purpose), and no tag value, UID or path can be read back from them. ``score``
marks each scored series found in either set (``TrainingOverlap``), in its ``warnings``, in
``summary.json`` and on the console.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "training_data.json"
VERSION = 1
IN_TRAINING = "in the model's training data: its result says nothing about new patients"
"""The warning a scored series gets when the model was trained on it."""


def uid_digest(uid: str) -> str:
    return hashlib.blake2b(uid.encode(), digest_size=16).hexdigest()


def write_training_data(model_dir: Path, rows: Iterable[dict]) -> Path:
    """``model_dir/training_data.json`` from the training manifest rows (``path``, ``series_uid``)."""
    from lung_effnet.preprocess.cache import digest_of

    rows = list(rows)
    record = {"version": VERSION,
              "series": sorted({uid_digest(r["series_uid"]) for r in rows if r.get("series_uid")}),
              "files": sorted({digest_of(r["path"]) for r in rows})}
    path = Path(model_dir) / FILE_NAME
    path.write_text(json.dumps(record) + "\n")
    return path


class TrainingOverlap:
    """Tests scored series against a model's ``training_data.json`` (module docstring)."""

    def __init__(self, record: dict):
        self.series, self.files = set(record.get("series", [])), set(record.get("files", []))

    @classmethod
    def of_model_dir(cls, model_dir: Path) -> TrainingOverlap | None:
        """The model's record, or ``None`` (a model written before it existed: nothing to compare)."""
        path = Path(model_dir) / FILE_NAME
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: not readable (%s): training data not compared", path, type(exc).__name__)
            return None

    def seen_series(self, series_uid: str) -> bool:
        """Whether the model was trained on this DICOM series (its UID as found in the headers)."""
        return uid_digest(series_uid) in self.series

    def seen_file(self, path: str | Path) -> bool:
        """Whether the model was trained on this file (a NIfTI volume, a 2D image), by content."""
        from lung_effnet.preprocess.cache import digest_of

        return digest_of(str(path)) in self.files

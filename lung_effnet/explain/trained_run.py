"""What a finished ``train`` run left behind, loaded from its folder or from MLflow.

``load_run(folder | parent run id | None)`` gives a ``TrainedRun``: the fold ensemble, the
out-of-fold predictions, the manifest training saw, the CV summary. The saliency report and the
notebooks start from it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import MissingInputError
from lung_effnet.tracking import DEFAULT_TRACKING_URI, download_run_files, latest_train_run_id

if TYPE_CHECKING:
    from lung_effnet.models.predictor import Predictor


@dataclass
class TrainedRun:
    """What a finished ``train`` run left behind, wherever it lives (its folder, or MLflow).

    Attributes:
        predictor: the fold ensemble; ``predictor.model.members[k]`` is fold ``k``'s model.
        oof: rows of ``oof_predictions.csv`` (``path, patient_id, fold, label, p_<class>, slice_index, ...``).
        manifest: rows of the run's ``ingest/manifest.csv`` (paths absolute), every row training saw.
        summary: ``cv_summary.json`` (empty when the run folder has none yet).
        folder: the run folder holding these files; ``None`` for a run read from MLflow (its files were
            downloaded, read and the download removed).
        parent_run_id, tracking_uri: the MLflow parent run, when known.
    """

    predictor: Predictor
    oof: list[dict]
    manifest: list[dict]
    summary: dict
    folder: Path | None
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def config(self):
        return self.predictor.config

    def probabilities(self) -> np.ndarray:
        """``(N, 3)`` out-of-fold probabilities in ``oof`` order."""
        return np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in self.oof])


def _read_csv(path: Path) -> list[dict]:
    from lung_effnet.io.ledger import read_csv_rows  # cells as train wrote them, spreadsheet quoting undone

    return read_csv_rows(path)


RUN_FILES = ("cv_summary.json", "oof_predictions.csv", "ingest/manifest.csv")
"""What ``load_run`` reads of a run in MLflow (besides its logged model)."""

RUN_ID = re.compile(r"[0-9a-f]{32}")
"""An MLflow run id (a uuid4 in hex): what a ``run`` value that names no folder must look like."""


def search_dirs() -> list[Path]:
    """Where a relative run folder or sqlite store path is looked up, in order: the working directory,
    then ``$PWD``, the directory the user's shell was in. A Jupyter kernel runs in the notebook's
    folder (``notebooks/``) but inherits ``$PWD`` from the shell that started Jupyter, so
    ``LUNG_EFFNET_RUN=demo_output/train`` means what it meant at that prompt."""
    dirs = [Path.cwd()]
    pwd = os.environ.get("PWD")
    if pwd and Path(pwd).is_absolute() and Path(pwd).is_dir() and Path(pwd).resolve() != Path.cwd().resolve():
        dirs.append(Path(pwd))
    return dirs


def find_path(path: str | Path) -> Path | None:
    """``path`` if absolute and existing, else the first of ``search_dirs() / path`` that exists; ``None``
    when none does."""
    path = Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in search_dirs()]
    return next((c for c in candidates if c.exists()), None)


def store_uri(tracking_uri: str | None = None) -> str:
    """The MLflow store to read runs from: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``, with a relative sqlite path looked up as ``find_path`` does and made
    absolute. Reading never creates a store: MLflow would make an empty database at a path that does
    not exist, so that is an error here.

    Raises:
        MissingInputError: a sqlite store whose file is found nowhere.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri  # a server or another store: nothing is created by asking it
    path, sep, query = uri[len(prefix):].partition("?")
    found = find_path(path) if path and path != ":memory:" else None
    if found is None or not found.is_file():
        where = path if Path(path).is_absolute() else " or ".join(str(d / path) for d in search_dirs())
        raise MissingInputError(
            f"no MLflow store at {uri} ({where} does not exist; nothing was created): set LUNG_EFFNET_RUN "
            f"(or --run) to a train output folder, or MLFLOW_TRACKING_URI (or --tracking-uri) to the store, "
            f"e.g. sqlite:////absolute/path/mlflow.db")
    return f"{prefix}{found.resolve()}{sep}{query}"


def load_run(run: str | Path | None = None, tracking_uri: str | None = None) -> TrainedRun:
    """Open a finished ``train`` run: its output folder, an MLflow parent run id, or ``None``
    (``$LUNG_EFFNET_RUN``, else the latest finished run in the MLflow store).

    A relative folder is looked up in ``search_dirs()`` (the working directory, then ``$PWD``); a
    value is taken as a run id only when it names no existing path. The store is ``store_uri(tracking_uri)``:
    nothing here creates one.

    Raises:
        MissingInputError: no such folder, run or store, or the run lacks the outputs a report needs.
    """
    value = str(run or os.environ.get("LUNG_EFFNET_RUN") or "")
    if not value:
        uri = store_uri(tracking_uri)
        return _run_from_mlflow(latest_train_run_id(uri), uri)
    folder = find_path(value)
    if folder is not None:
        if not folder.is_dir():
            raise MissingInputError(f"run {value} (--run, LUNG_EFFNET_RUN): {folder} is a file, not a train output folder")
        return _run_from_folder(folder, tracking_uri)
    if not RUN_ID.fullmatch(value):
        where = value if Path(value).is_absolute() else " or ".join(str(d / value) for d in search_dirs())
        raise MissingInputError(f"run {value} (--run, LUNG_EFFNET_RUN): no such folder ({where}), and not an MLflow "
                                f"run id (32 hex digits)")
    return _run_from_mlflow(value, store_uri(tracking_uri))


def _run_from_mlflow(run_id: str, uri: str) -> TrainedRun:
    """A run read into memory from a temporary download, removed before returning."""
    from lung_effnet.ingest.manifest import read_manifest
    from lung_effnet.models.predictor import load_model

    with tempfile.TemporaryDirectory(prefix=f"lung-effnet-run-{run_id[:8]}-") as tmp:
        download_run_files(run_id, RUN_FILES, Path(tmp), uri)
        summary = json.loads((Path(tmp) / "cv_summary.json").read_text())
        oof, manifest = _read_csv(Path(tmp) / "oof_predictions.csv"), read_manifest(Path(tmp) / "ingest" / "manifest.csv")
    predictor = load_model(summary["mlflow"]["model_uri"])
    return TrainedRun(predictor, oof, manifest, summary, None, run_id, summary["mlflow"]["tracking_uri"])


def _run_from_folder(folder: Path, tracking_uri: str | None) -> TrainedRun:
    from lung_effnet.ingest.manifest import read_manifest
    from lung_effnet.models.predictor import load_model

    for name in ("oof_predictions.csv", "model", "ingest/manifest.csv"):
        if not (folder / name).exists():
            raise MissingInputError(f"{folder}: not a finished train run (no {name})")
    summary = json.loads((folder / "cv_summary.json").read_text()) if (folder / "cv_summary.json").exists() else {}
    predictor = load_model(folder / "model")
    state = json.loads((folder / "mlflow_run.json").read_text()) if (folder / "mlflow_run.json").exists() else {}
    parent, uri = state.get("parent_run_id"), summary.get("mlflow", {}).get("tracking_uri", tracking_uri)
    return TrainedRun(predictor, _read_csv(folder / "oof_predictions.csv"), read_manifest(folder / "ingest" / "manifest.csv"),
                      summary, folder, parent, uri)

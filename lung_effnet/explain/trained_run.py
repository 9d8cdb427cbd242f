"""What a finished ``train`` run left behind, loaded from its folder or from MLflow.

``load_run(folder | parent run id | None)`` gives a ``TrainedRun``: the fold ensemble, the
out-of-fold predictions, the manifest training saw, the CV summary. The saliency report and the
notebooks start from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import MissingInputError
from lung_effnet.tracking import download_run_files, latest_train_run_id

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


def load_run(run: str | Path | None = None, tracking_uri: str | None = None) -> TrainedRun:
    """Open a finished ``train`` run: its output folder, an MLflow parent run id, or ``None``
    (``$LUNG_EFFNET_RUN``, else the latest finished run in the MLflow store).

    Raises:
        MissingInputError: no such folder or run, or it lacks the outputs a report needs.
    """
    import os
    import tempfile

    from lung_effnet.ingest.manifest import read_manifest
    from lung_effnet.models.predictor import load_model

    run = run or os.environ.get("LUNG_EFFNET_RUN") or latest_train_run_id(tracking_uri)
    folder = Path(run)
    if not folder.is_dir() and (os.sep in str(run) or "/" in str(run) or str(run).startswith(".") or folder.exists()):
        raise MissingInputError(f"--run: not a train output folder or an MLflow run id: {run}")
    if not folder.is_dir():  # a run id: read into memory from a temporary download, removed before returning
        with tempfile.TemporaryDirectory(prefix=f"lung-effnet-run-{str(run)[:8]}-") as tmp:
            download_run_files(str(run), RUN_FILES, Path(tmp), tracking_uri)
            summary = json.loads((Path(tmp) / "cv_summary.json").read_text())
            oof, manifest = _read_csv(Path(tmp) / "oof_predictions.csv"), read_manifest(Path(tmp) / "ingest" / "manifest.csv")
        predictor = load_model(summary["mlflow"]["model_uri"])
        return TrainedRun(predictor, oof, manifest, summary, None, str(run), summary["mlflow"]["tracking_uri"])
    for name in ("oof_predictions.csv", "model", "ingest/manifest.csv"):
        if not (folder / name).exists():
            raise MissingInputError(f"{folder}: not a finished train run (no {name})")
    summary = json.loads((folder / "cv_summary.json").read_text()) if (folder / "cv_summary.json").exists() else {}
    predictor = load_model(folder / "model")
    state = json.loads((folder / "mlflow_run.json").read_text()) if (folder / "mlflow_run.json").exists() else {}
    parent, uri = state.get("parent_run_id"), summary.get("mlflow", {}).get("tracking_uri", tracking_uri)
    return TrainedRun(predictor, _read_csv(folder / "oof_predictions.csv"), read_manifest(folder / "ingest" / "manifest.csv"),
                      summary, folder, parent, uri)

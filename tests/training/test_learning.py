"""Acceptance test of the training issue: the committed demo recipe learns under patient-grouped CV
on phantom patients it has never seen, and the same run with labels shuffled between patients stays
near chance (the test can fail: a leak between folds, or a metric that rewards nothing, would lift
the control too).

About a minute on 2 CPU cores: 36 NIfTI phantom patients at 256 px (the pipeline crops to the lungs
and shrinks to 96 px, as it does a 512 px archive), 3 folds, the demo's epochs, through ``run_cv``
like ``lung-effnet train``. Seed 7 is neither a demo seed (0-2) nor the pretraining seed (1000).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lung_effnet.config import load_config
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.cv import run_cv

SETTINGS = ["cv.folds=3", "report.enabled=false", "tracking.experiment=learning-test"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    data = write_synthetic_dataset(root / "data", "nifti", n_patients=36, seed=7, size_px=256, n_slices=6,
                                   progress=False)
    return root, data


def _cv(root, data, labels_csv, name, monkeypatch) -> dict:
    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(root / "cache"))
    cfg = load_config("demo_cpu", SETTINGS)
    return run_cv(data, root / name, cfg, labels_csv=labels_csv, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                  progress=False)["oof"]


def test_demo_recipe_learns_under_patient_grouped_cv(phantoms, monkeypatch):
    root, data = phantoms
    oof = _cv(root, data, data / "labels.csv", "real", monkeypatch)
    assert oof["auroc_macro"] >= 0.8, oof
    assert oof["auroc_malignant"] >= 0.9, oof
    assert oof["auroc_macro_ci95"][0] >= 0.65, oof["auroc_macro_ci95"]  # the CI resamples patients


def test_labels_shuffled_between_patients_stay_near_chance(phantoms, monkeypatch):
    root, data = phantoms
    with open(data / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = [r["label"] for r in rows]
    np.random.default_rng(0).shuffle(labels)  # one label per patient: a permutation across patients
    shuffled = data / "labels_shuffled.csv"  # beside labels.csv: its paths are relative to its folder
    with open(shuffled, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "label": label} for r, label in zip(rows, labels))
    oof = _cv(root, data, shuffled, "shuffled", monkeypatch)
    assert 0.3 <= oof["auroc_macro"] <= 0.7, oof

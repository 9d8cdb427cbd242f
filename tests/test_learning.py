"""Acceptance test of the training issue: the recipe learns from scratch on phantoms, on CPU.

Marked slow (about 5 minutes on 2 cores) and NOT yet passing: with BatchNorm statistics
re-estimated before evaluation (the fix that makes easy tasks learn within an epoch,
tests/test_train.py) this split still reached only AUROC 0.516 (benchmarks/RESULTS.md). It stays
here, out of the default run, as the target the open training issue must meet; run it with
``pytest -m slow``.
"""

from __future__ import annotations

import pytest

from lung_effnet.config import load_config
from lung_effnet.cv import run_cv
from lung_effnet.data.synthetic_dataset import write_synthetic_dataset


@pytest.mark.slow
def test_demo_recipe_beats_chance_clearly_under_patient_grouped_cv(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    data = write_synthetic_dataset(tmp_path / "data", "nifti", n_patients=60, seed=0, size_px=96, n_slices=8, progress=False)
    cfg = load_config("demo_cpu", ["cv.folds=3", "tracking.experiment=learning-test"])
    summary = run_cv(data, tmp_path / "run", cfg, labels_csv=data / "labels.csv",
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    oof = summary["oof"]
    # Out-of-fold over 60 patients; the CI resamples patients, so "clearly" means its lower end is above chance.
    assert oof["auroc_macro"] > 0.58, oof
    assert oof["auroc_macro_ci95"][0] > 0.5, oof["auroc_macro_ci95"]
    assert oof["balanced_accuracy"] > 1 / 3

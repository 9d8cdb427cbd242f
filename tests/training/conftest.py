"""The tiny training run shared by the train-stage tests (``test_cv``, ``test_fold_jobs``): trained
once per session."""

from __future__ import annotations

import pytest

from lung_effnet.config import load_config
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.cv import run_cv

TINY = ["data.image_size=32", "data.context_slices=0", "train.epochs=2", "train.batch_size=8", "cv.folds=3", "train.val_fraction=0.0",
        "data.slices=all", "tracking.experiment=tiny"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """9 NIfTI phantom patients, 4 slices each, 48 px, with ``labels.csv``."""
    root = tmp_path_factory.mktemp("tiny")
    return write_synthetic_dataset(root / "data", "nifti", n_patients=9, seed=5, size_px=48, n_slices=4, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """``(folder, summary, tracking URI)`` of one finished ``TINY`` run in ``folder / "train"`` (its
    cache in ``folder / "cache"``). Do not change its files: several modules read them."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, f"data.cache_dir={out / 'cache'}"])
    uri = f"sqlite:///{out / 'mlflow.db'}"
    summary = run_cv(tiny_data, out / "train", cfg, labels_csv=tiny_data / "labels.csv", tracking_uri=uri, progress=False)
    return out, summary, uri

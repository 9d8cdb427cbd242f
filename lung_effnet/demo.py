"""The main job on embedded defaults: a synthetic DICOM archive, trained under patient-grouped CV.

Needs no data and no network: ``lung-effnet demo`` (or ``python pipelines/demo.py``). Writes
``OUT/data`` (synthetic 512 px DICOM with localizers and SR documents, as real archives have, plus
labels and lesion masks) and ``OUT/train`` (the train stage's outputs with ``configs/demo_cpu.yaml``,
which starts from the package's phantom-pretrained weights), tracked in the local MLflow store
(``sqlite:///mlflow.db`` in the working directory by default).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lung_effnet.config import load_config
from lung_effnet.console import print_cv_summary
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.cv import run_cv

DEMO_PATIENTS = 60
DEMO_SLICES = 8
DEMO_SIZE_PX = 512
"""A clinical matrix (0.68 mm a pixel over 350 mm): the preprocessing crops to the lungs and
shrinks, as it does real CT; drawing at the model's input size would make a 6 mm nodule 2 px."""


def run_demo(out: Path, n_patients: int = DEMO_PATIENTS, seed: int = 0, progress: bool = True,
             config: str = "demo_cpu", tracking_uri: str | None = None) -> dict:
    """Synthesize, then train; a second run replaces the first one's outputs in ``out``."""
    out = Path(out)
    cfg = load_config(config, [f"seed={seed}"])
    data = write_synthetic_dataset(out / "data", "dicom", n_patients=n_patients, seed=seed, size_px=DEMO_SIZE_PX,
                                   n_slices=DEMO_SLICES, extras=True, progress=progress)
    shutil.rmtree(out / "train", ignore_errors=True)  # the demo's own previous run
    summary = run_cv(data, out / "train", cfg, labels_csv=Path(data) / "labels.csv", tracking_uri=tracking_uri,
                     progress=progress)
    print_cv_summary(summary, out / "train")
    return summary


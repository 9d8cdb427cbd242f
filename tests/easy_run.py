"""One tiny trained run shared by the saliency tests (explain, report, notebooks) and
``benchmarks/bench_cam_layers.py``; ``conftest.py`` serves it as the ``easy_run`` / ``saliency_run`` fixtures.

The learning problem is made as easy as the phantoms allow (the default phantoms learn only weakly
on CPU, OOF AUROC 0.55-0.68 after minutes):

- two classes only, ``malignant`` vs ``normal`` (no benign: its 1-2 px nodules are invisible at
  CPU sizes);
- the anatomy is the project's chest phantom (``make_phantom("normal")``: body, lungs with texture,
  vessels, ribs, noise), and a malignant patient gets one large solid mass painted into a lung
  (radius ``MASS_RADIUS_PX`` at 96 px, i.e. 35-55 mm: a big, easy lesion, with its mask);
- 3 slices per patient, all through the mass; 96 px; 2 folds.

The default (16 patients, 96 px, 3 epochs) only has to finish: the report and notebook tests
need a run, not a good one. The learning test of explain/test_gradcam.py uses 32 patients at 128 px and
15 epochs, which learns the mass (OOF AUROC 0.93 when measured). Each run is trained once per test
session (``easy_run``), through ``run_cv`` like a real run:
NIfTI files + labels CSV -> ingest -> cache -> folds -> MLflow (a sqlite store in the temp dir).
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np
from scipy import ndimage

SIZE_PX = 96
N_PATIENTS = 16
MASS_RADIUS_PX = (5.0, 8.0)
MASS_HU = 40.0
TRAIN = ["data.image_size=96", "cv.folds=2", "train.epochs=3", "train.batch_size=8", "train.val_fraction=0.0",
         "train.lr=0.002", "model.drop_connect=0.0", "augment.prob=0.5", "tracking.experiment=saliency-tiny",
         "report.top=2"]


def paint_mass(hu: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a ball of soft tissue into the lungs of ``hu`` ``(Z, Y, X)`` (in place), centred on the
    middle slice where the lung is deep enough; returns its ``(Z, Y, X)`` uint8 mask."""
    radius = rng.uniform(*MASS_RADIUS_PX)
    z = hu.shape[0] // 2
    depth = ndimage.distance_transform_edt(lungs[z] > 0)
    candidates = np.argwhere(depth >= radius * 0.8)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max() * 0.9)
    cy, cx = candidates[rng.integers(len(candidates))]
    zz, yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 + (2.0 * (zz - z)) ** 2) <= radius ** 2
    hu[inside] = MASS_HU + rng.normal(0, 15, int(inside.sum()))
    return inside.astype(np.uint8)


def write_easy_phantoms(out: Path, n_patients: int = N_PATIENTS, seed: int = 0) -> Path:
    """NIfTI volumes (``P000k/ct.nii.gz``), masks and ``labels.csv`` (path,label,patient_id,mask_path)."""
    from lung_effnet.io.volume import canonical_affine, write_nifti
    from lung_effnet.synthetic.phantom import make_phantom

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ss in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(ss)
        phantom = make_phantom("normal", rng, size_px=SIZE_PX, n_slices=3)
        label = "malignant" if i % 2 == 0 else "normal"
        mask = paint_mass(phantom.hu, phantom.lungs, rng) if label == "malignant" else np.zeros_like(phantom.mask)
        affine = canonical_affine(phantom.spacing)
        write_nifti(out / f"P{i:04d}" / "ct.nii.gz", phantom.hu, affine, dtype=np.int16)
        write_nifti(out / "masks" / f"P{i:04d}.nii.gz", mask, affine, dtype=np.uint8)
        rows.append({"path": f"P{i:04d}/ct.nii.gz", "label": label, "patient_id": f"EASY-{i:04d}",
                     "mask_path": f"masks/P{i:04d}.nii.gz"})
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@cache
def easy_run(base: Path, extra: tuple[str, ...] = (), n_patients: int = N_PATIENTS) -> dict:
    """Train a run under ``base`` once per process (config ``TRAIN`` + ``extra`` overrides);
    returns paths, summary and tracking URI. The default (3 epochs) is for the report and notebook
    tests, which need a finished run, not a good one."""
    from lung_effnet.config import load_config
    from lung_effnet.training.cv import run_cv

    data = write_easy_phantoms(base / "data", n_patients)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cfg = load_config(None, [*TRAIN, f"data.cache_dir={base / 'cache'}", *extra])
    summary = run_cv(data, base / "run", cfg, labels_csv=data / "labels.csv", tracking_uri=uri, progress=False)
    return {"run": base / "run", "data": data, "summary": summary, "uri": uri, "cache": base / "cache"}

"""The main job on embedded defaults: a synthetic DICOM archive, ingested.

Needs no data and no network: ``python -m pipelines.demo`` or ``lung-effnet demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lung_effnet.console import print_ingest_summary
from lung_effnet.data.ingest import ingest
from lung_effnet.data.synthetic_dataset import write_synthetic_dataset


def run_demo(out: Path, n_patients: int = 12, seed: int = 0, progress: bool = True) -> dict:
    """Write ``out/data`` (synthetic DICOM with localizers and SRs) and ingest it to ``out/ingest``."""
    out = Path(out)
    data = write_synthetic_dataset(out / "data", "dicom", n_patients=n_patients, seed=seed, extras=True)
    result = ingest(data, out / "ingest", labels_csv=Path(data) / "labels.csv", write_nifti=True, progress=progress)
    summary = result.summary()
    print_ingest_summary(summary, out / "ingest")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run_demo(args.out, args.patients, args.seed)

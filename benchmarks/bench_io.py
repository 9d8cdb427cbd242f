"""DICOM series reading speed: the project's reader against plain pydicom, on one core.

Writes one synthetic 512x512 chest-CT series (default 200 slices) per storage variant, then times,
on the same files with a warm page cache (best of --repeats, the two alternating):

- plain:   ``pydicom.dcmread(f).pixel_array`` for every file (no sorting, no HU, no checks);
- project: ``index_dicom_tree`` + ``load_series``: header pass, grouping by SeriesInstanceUID,
  ordering along the slice normal, HU conversion, canonical orientation -> a (Z, Y, X) volume.

Prints slices/s for both and their ratio (goal: project >= 0.8 x plain).

    python benchmarks/bench_io.py [--slices 200] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pin_to_one_core() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def write_series(out: Path, size: int, n_slices: int, compression: str | None) -> list[Path]:
    from lung_effnet.synthetic.dicom_writer import write_dicom_series
    from lung_effnet.synthetic.phantom import make_phantom

    rng = np.random.default_rng(0)
    phantom = make_phantom("malignant", rng, size_px=size, n_slices=n_slices)
    return write_dicom_series(phantom.hu, phantom.spacing, out, patient_id="SYN-BENCH", patient_name="SYNTH^BENCH",
                              rng=rng, compression=compression)


def time_best(fns, repeats: int) -> list[float]:
    """Best wall time of each function; the functions alternate, so drift hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def plain_pydicom(files: list[Path]) -> None:
    import pydicom

    for f in files:
        _ = pydicom.dcmread(f).pixel_array  # decode: the cost being measured


def project_reader(folder: Path) -> None:
    from lung_effnet.io.dicom_index import index_dicom_tree
    from lung_effnet.io.dicom_series import load_series
    from lung_effnet.io.ledger import Ledger

    ledger = Ledger()
    series = index_dicom_tree(folder, ledger, progress=False)
    volumes = [load_series(entry, ledger) for entry in series.values()]
    assert len(volumes) == 1 and volumes[0] is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="none,jpeg2000", help="comma-separated: none, jpeg2000, jpegls, rle")
    args = parser.parse_args(argv)
    pin_to_one_core()
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            folder = Path(tmp) / variant
            files = write_series(folder, args.size, args.slices, None if variant == "none" else variant)
            plain_pydicom(files)  # warm the page cache and the decoders' imports
            project_reader(folder)
            t_plain, t_project = time_best([lambda files=files: plain_pydicom(files), lambda folder=folder: project_reader(folder)], args.repeats)
            n = len(files)
            rows.append([variant, n, f"{n / t_plain:.1f}", f"{n / t_project:.1f}", f"{t_plain / t_project:.2f}"])
    from lung_effnet.console import format_table

    print(format_table(["storage", "slices", "plain pydicom slices/s", "project slices/s", "project / plain"], rows,
                       f"DICOM series read, {args.size}x{args.size}, one core, best of {args.repeats}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

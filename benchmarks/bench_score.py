"""Batch scoring speed: ``score_archive`` against a naive loop and against raw parallel decoding.

Writes one synthetic DICOM archive (``--series`` chest-CT phantoms of ``--slices`` slices at
``--size`` px, one series per folder) and a fold ensemble (``--folds`` x EfficientNet-b0 at
``--image-size`` as ``configs/default.yaml`` builds it, lesion finder included, with the weights
training starts from; speed does not depend on them), then times, on the
same files with a warm page cache (best of ``--repeats``, the methods alternating):

- naive:   for each series, read it (``index_dicom_tree`` + ``load_series``), then score it slice
           by slice (``Predictor.predict_proba`` on one slice at a time), in one process;
- project: ``lung_effnet.scoring.score_archive`` end to end (worker start, header pass, decode and
           preprocessing in ``--workers`` processes, batched inference, journal, output files);
- data path: the project without the model: header pass, decode and crop boxes in ``--workers``
           processes (``prepared_units``; this process takes a share whenever it would wait for
           them, as ``score`` does: ``scoring.helping``), windowing, crop and resize in this
           process on ``--device`` (``finish_unit``), the images dropped: what the data path can
           feed a model (the pool started before the clock: this row and the next time the flow,
           not the start);
- decode side: the data path without windowing, crop and resize (``finish_unit``): the part that
           stays on the CPU when a GPU does those, so the data path's ceiling there (this process
           idles otherwise, so it decodes about half the slices on 1 worker);
- raw decode: ``pydicom.dcmread(f).pixel_array`` for every file in ``--workers`` processes, no
           model: the ceiling the data path can reach (the issue's yardstick: same worker count);
- raw decode, one more process: the same in ``--workers`` + 1 processes, as many as the project
           runs (its scoring process decodes too when it would wait): the ratio against this row
           says what the project makes of the same cores.

Prints series/min and slices/s for each, project / naive (target >= 3 on CPU) and project / raw
decode (target >= 0.8 on a GPU); data path / raw decode says how much of that the data path
alone allows, and so whether a miss is the model's or the data path's.

    python benchmarks/bench_score.py --device cpu --series 8 --slices 32 --workers 1
    python benchmarks/bench_score.py --device cpu --series 4 --slices 16 --compression jpeg2000 --skip-naive
    python benchmarks/bench_score.py --device cuda --series 48 --slices 128 --workers 15 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_archive(root: Path, n_series: int, n_slices: int, size: int, compression: str | None = None) -> list[Path]:
    from lung_effnet.synthetic.dicom_writer import write_dicom_series
    from lung_effnet.synthetic.phantom import make_phantom

    folders = []
    for i in range(n_series):
        rng = np.random.default_rng(i)
        phantom = make_phantom(("benign", "malignant", "normal")[i % 3], rng, size_px=size, n_slices=n_slices)
        folder = root / f"S{i:04d}"
        write_dicom_series(phantom.hu, phantom.spacing, folder, patient_id=f"BENCH-{i}", patient_name="BENCH^SCORE", rng=rng,
                           compression=compression)
        folders.append(folder)
    return folders


def write_model(out: Path, image_size: int, folds: int) -> Path:
    import torch

    from lung_effnet.config import load_config
    from lung_effnet.models.predictor import save_model_dir
    from lung_effnet.training.cv import initial_member

    cfg = load_config(None, [f"data.image_size={image_size}"])
    torch.manual_seed(0)
    # as training starts each fold: the configured lesion finder (the same in every fold, as in a trained
    # model, so scoring runs it once) and pretrained weights
    return save_model_dir(out, cfg, [initial_member(cfg).state_dict() for _ in range(folds)])


def naive(model_dir: Path, folders: list[Path], device: str) -> int:
    import lung_effnet
    from lung_effnet.io.dicom_index import index_dicom_tree
    from lung_effnet.io.dicom_series import load_series
    from lung_effnet.io.ledger import Ledger

    predictor = lung_effnet.load_model(model_dir, device)
    n = 0
    for folder in folders:
        ledger = Ledger()
        for entry in index_dicom_tree(folder, ledger, progress=False).values():
            volume = load_series(entry, ledger)
            for plane in volume.hu:
                predictor.predict_proba([plane])
                n += 1
    return n


def project(model_dir: Path, root: Path, out: Path, device: str, workers: int, batch_size: int) -> int:
    from lung_effnet.scoring import score_archive

    shutil.rmtree(out, ignore_errors=True)
    summary = score_archive(model_dir, root, out, batch_size=batch_size, device=device, workers=workers, progress=False)
    return summary["counts"]["slices_scored"]


def started_pool(workers: int, device: str):
    """The project's decode pool with its processes up (a no-op round trip each): the data-path
    rows time the flow of slices, not the pool's start (the project row includes it). On CUDA the
    workers decode compressed pixel data as ``score --device cuda`` does (``io.gpu_decode``)."""
    from lung_effnet.scoring.runner import start_pool

    pool = start_pool(workers, gpu_decode=device == "cuda")
    if pool is not None:
        list(pool.map(int, range(4 * workers)))
    return pool


def decode_side(cfg, root: Path, pool, workers: int) -> int:
    """The data path's CPU part: header pass, decode and crop boxes in the workers, handed over;
    what stays on the CPU when a GPU windows, crops and resizes."""
    from lung_effnet.scoring.discover import discover
    from lung_effnet.scoring.runner import header_map, prepared_units

    units = discover(root, progress=False, map_fn=header_map(pool, workers)).units
    return sum(sum(len(v) for v in prepared.volumes) for _, prepared in prepared_units(units, cfg, pool, workers, finish=False))


def data_path(cfg, root: Path, pool, workers: int, device: str) -> int:
    """Header pass, decode and crop boxes in the workers; windowing, crop and resize here on
    ``device`` (``finish_unit``), the images dropped."""
    import torch

    from lung_effnet.scoring.discover import discover
    from lung_effnet.scoring.prepare import finish_unit
    from lung_effnet.scoring.runner import header_map, prepared_units

    units = discover(root, progress=False, map_fn=header_map(pool, workers)).units
    n = sum(len(finish_unit(prepared, cfg, device))
            for _, prepared in prepared_units(units, cfg, pool, workers, finish=device == "cpu"))
    if device == "cuda":
        torch.cuda.synchronize()
    return n


def _decode_files(files: list[str]) -> int:
    import pydicom

    for f in files:
        _ = pydicom.dcmread(f).pixel_array  # decode only
    return len(files)


def raw_decode(folders: list[Path], workers: int) -> int:
    from lung_effnet.io.gpu_decode import disable_gpu_decode

    chunks = [[str(f) for f in sorted(folder.iterdir())] for folder in folders]
    # pydicom's CPU plugins, also where this process registered nvImageCodec (score_archive on CUDA)
    with ProcessPoolExecutor(max(1, workers), initializer=disable_gpu_decode) as pool:
        return sum(pool.map(_decode_files, chunks))


def tree_memory(pid: int) -> tuple[int, int]:
    """``(RSS, PSS)`` in bytes of a process and all its descendants (PSS shares shared pages out,
    so it does not count the forkserver's pages once per worker as the RSS sum does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo, rss, pss = [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Rss:", "Pss:")):
                    kb = int(line.split()[1]) * 1024
                    rss, pss = (rss + kb, pss) if line.startswith("Rss:") else (rss, pss + kb)
        except OSError:
            continue
    return rss, pss


def peak_memory(args) -> None:
    """Score one ``--slices`` x ``--size`` series with the CLI and sample the process tree's memory."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="bench_score_mem_"))
    try:
        write_archive(work / "archive", 1, args.slices, args.size)
        model_dir = write_model(work / "model", args.image_size, args.folds)
        cmd = [sys.executable, "-m", "lung_effnet.cli", "score", "-q", "--model", str(model_dir), "--input",
               str(work / "archive"), "--out", str(work / "out"), "--device", args.device, "--workers", str(args.workers),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.Popen(cmd)
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.05)
        assert proc.returncode == 0
        print(f"one series of {args.slices} x {args.size}x{args.size} px ({args.slices * args.size ** 2 * 2 / 2**20:.0f} MiB "
              f"as int16), {args.workers} workers, batch {args.batch_size}, {args.folds}-fold b0 at {args.image_size} px:")
        print(f"peak memory of the score process tree: PSS {peak_pss / 2**30:.2f} GiB, RSS sum {peak_rss / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="DICOM matrix, px")
    parser.add_argument("--image-size", type=int, default=224, help="model input, px")
    parser.add_argument("--compression", choices=["none", "jpeg2000", "jpegls", "rle"], default="none",
                        help="transfer syntax of the archive (lossless); JPEG 2000 decodes ~50x slower than none")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="default: what `lung-effnet score` picks for --device")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true", help="GPU runs: the naive loop takes long and is not the GPU target")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory of scoring one --slices x --size series (e.g. --slices 600 --size 512)")
    args = parser.parse_args()
    if args.workers is None:
        import torch

        from lung_effnet.scoring.runner import default_workers

        args.workers = default_workers(torch.device(args.device))
    if args.memory:
        return peak_memory(args)

    import torch
    import yaml

    from lung_effnet.config import from_dict
    from lung_effnet.console import format_table

    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    pool = None
    try:
        compression = None if args.compression == "none" else args.compression
        folders = write_archive(work / "archive", args.series, args.slices, args.size, compression)
        model_dir = write_model(work / "model", args.image_size, args.folds)
        cfg = from_dict(yaml.safe_load((model_dir / "config.yaml").read_text())).data  # the model's preprocessing
        pool = started_pool(args.workers, args.device)
        methods = {"project": lambda: project(model_dir, work / "archive", work / "out", args.device, args.workers, args.batch_size),
                   "data path": lambda: data_path(cfg, work / "archive", pool, args.workers, args.device),
                   "decode side": lambda: decode_side(cfg, work / "archive", pool, args.workers),
                   "raw decode": lambda: raw_decode(folders, args.workers),
                   "raw decode +1": lambda: raw_decode(folders, args.workers + 1)}
        if not args.skip_naive:
            methods = {"naive": lambda: naive(model_dir, folders, args.device), **methods}
        best = {name: float("inf") for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                n = fn()
                best[name] = min(best[name], time.perf_counter() - start)
                assert n == args.series * args.slices, f"{name} handled {n} slices"
        n = args.series * args.slices
        labels = {"naive": "naive loop (read series, score slice by slice, 1 process)",
                  "project": f"project (score_archive, {args.workers} workers, batch {args.batch_size})",
                  "data path": f"data path (project without the model, {args.workers} workers)",
                  "decode side": "  its decode side (header pass, decode, crop boxes)",
                  "raw decode": f"raw pydicom decode ({args.workers} processes, no model)",
                  "raw decode +1": f"raw pydicom decode ({args.workers + 1} processes, no model)"}
        rows = [[labels[k], f"{args.series / t * 60:.1f}", f"{n / t:.1f}", f"{t:.1f}"] for k, t in best.items()]
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        if args.device == "cuda":
            from lung_effnet.io.gpu_decode import enable_gpu_decode

            device += f"; compressed DICOM: {enable_gpu_decode()[1]} (raw decode: pydicom's CPU plugins)"
        print(format_table(["method", "series/min", "slices/s", "s"], rows,
                           f"Batch scoring, {args.series} series x {args.slices} slices of {args.size} px ({args.compression}), "
                           f"{args.folds}-fold b0 at {args.image_size} px, {device}, best of {args.repeats}"))
        if "naive" in best:
            print(f"project / naive loop:  {best['naive'] / best['project']:.2f}x  (target >= 3 on CPU)")
        print(f"project / raw decode:  {best['raw decode'] / best['project']:.2f}  (target >= 0.8 on a GPU)")
        print(f"data path / raw decode:  {best['raw decode'] / best['data path']:.2f}  (target >= 0.8: what the data path allows a model)")
        print(f"data path / raw decode in {args.workers + 1} processes:  {best['raw decode +1'] / best['data path']:.2f}  "
              f"(the same cores as the project's workers and scoring process)")
        print(f"decode side / raw decode:  {best['raw decode'] / best['decode side']:.2f}  (the data path's ceiling when "
              f"windowing, crop and resize run on a GPU)")
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

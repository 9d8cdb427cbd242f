"""Training throughput: the model alone, the project's loop from its cache, and a MONAI-tutorial loop.

All train MONAI EfficientNet-b0 (3 classes) at --size px with batch --batch, from random weights;
(a), (b), (d) on the project's 2.5D input (3 channels), (c) on single slices as the tutorials do:

(a) model alone: one batch already on the device, forward + backward + optimizer step, with the
    project's settings (bf16 autocast + channels_last on CUDA), and in plain fp32 for reference;
(b) project loop: ``FoldTrainer.train_epoch`` on preprocessed phantom slices from the on-disk
    cache (``build_sample_set``), random augmentation on, balanced sampling, AMP;
(c) tutorial loop: ``monai.data.Dataset`` + ``DataLoader`` (--workers processes) with per-item
    transforms from DICOM files (LoadImage with pydicom, window, resize, random flip / rotate /
    zoom), fp32, as in MONAI's classification tutorials.
(d) the project loop without the model: ``FoldTrainer.batches`` alone (cache rows, balanced
    sampling, transfer, batched augmentation on the device): what the loop could feed a faster model.

Prints images/s for each and the ratios (targets: b >= 0.9 a, b >= 4 c; d > 10 a on CPU, d > 3,304
images/s on the H200).

    python benchmarks/bench_train.py --device cuda            # the GPU benchmark
    python benchmarks/bench_train.py --device cpu --size 64 --batch 8 --patients 3 --steps 2 --workers 0   # smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_data(root: Path, args) -> tuple[list[dict], list[Path], list[int]]:
    """Phantom DICOM archive + labels -> manifest rows (for the cache) and slice files (for c)."""
    from lung_effnet.classes import CLASSES
    from lung_effnet.ingest.sources import ingest
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    data = write_synthetic_dataset(root / "dicom", "dicom", n_patients=args.patients, seed=0, size_px=args.size,
                                   n_slices=args.slices, progress=False)
    result = ingest(data, root / "ingest", labels_csv=data / "labels.csv", progress=False)
    files = [Path(r["path"]) for r in result.rows]
    labels = [CLASSES.index(r["label"]) for r in result.rows]
    return result.rows, files, labels


def bench_model_alone(cfg, device, args, amp: bool) -> float:
    from lung_effnet.models.predictor import build_member

    model = build_member(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 2 * cfg.data.context_slices + 1, args.size, args.size, device=device)  # 2.5D channels
    y = torch.randint(0, 3, (args.batch,), device=device)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    def step():
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def project_trainer(cfg, rows, device, args, cache_dir: Path):
    """A ``FoldTrainer`` on the cached phantom slices, repeated so that one epoch is --steps
    batches (throughput does not depend on N), after --warmup batches of one warm-up epoch."""
    from lung_effnet.models.predictor import build_member
    from lung_effnet.preprocess.cache import build_sample_set
    from lung_effnet.training.fold import FoldData, FoldTrainer

    samples = build_sample_set(rows, cfg.data, cache_dir, progress=False)
    reps = max(1, -(-args.batch * args.steps // len(samples)))
    x = samples.images.repeat(reps, 1, 1, 1)[: args.batch * args.steps]
    y = torch.from_numpy(samples.labels).repeat(reps)[: args.batch * args.steps]
    data = FoldData(x, y, x[:0], y[:0])
    trainer = FoldTrainer(build_member(cfg), data, cfg, cache_dir / "fold", seed=0)
    warm = FoldData(x[: args.batch * args.warmup], y[: args.batch * args.warmup], x[:0], y[:0])
    trainer.data, saved = trainer._place(warm), trainer.data
    trainer.steps_per_epoch = args.warmup
    trainer.train_epoch()
    trainer.data, trainer.steps_per_epoch = saved, args.steps
    return trainer


def bench_project_loop(trainer, device, args) -> float:
    """(b): ``train_epoch``, the model included."""
    sync(device)
    start = time.perf_counter()
    trainer.train_epoch()
    sync(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def bench_data_loop(trainer, device, args) -> float:
    """(d): ``FoldTrainer.batches``, the same loop without the model: sampling, gathering the
    cached rows, transfer to the device, batched augmentation there. Best of 3 epochs."""
    best = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        checksum = sum(float(batch.x[0, 0, 0, 0]) for batch in trainer.batches())  # touch every batch
        sync(device)
        best = max(best, args.batch * args.steps / (time.perf_counter() - start))
        assert checksum == checksum  # not NaN: the batches were made
    return best


def bench_tutorial_loop(files, labels, device, args) -> float:
    from monai.data import DataLoader, Dataset
    from monai.networks.nets import EfficientNetBN
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        RandFlipd,
        RandRotated,
        RandZoomd,
        Resized,
        ScaleIntensityRanged,
    )

    transforms = Compose([
        LoadImaged("image", reader="PydicomReader"),
        EnsureChannelFirstd("image"),
        ScaleIntensityRanged("image", a_min=-1350, a_max=150, b_min=0.0, b_max=1.0, clip=True),
        Resized("image", spatial_size=(args.size, args.size)),
        RandFlipd("image", prob=0.5, spatial_axis=0),
        RandRotated("image", range_x=0.17, prob=0.8),
        RandZoomd("image", min_zoom=0.9, max_zoom=1.1, prob=0.8),
        EnsureTyped("image", data_type="tensor", track_meta=False),
    ])
    items = [{"image": str(f), "label": y} for f, y in zip(files, labels)]
    loader = DataLoader(Dataset(items, transforms), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    model = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    seen, start, batches = 0, None, 0
    while batches < args.warmup + args.steps:
        for batch in loader:
            x = batch["image"].to(device).float()
            y = torch.as_tensor(batch["label"]).to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batches += 1
            if batches == args.warmup:
                sync(device)
                start = time.perf_counter()
            elif batches > args.warmup:
                seen += len(y)
            if batches >= args.warmup + args.steps:
                break
    sync(device)
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--patients", type=int, default=24, help="phantom patients for the cache and the DICOM files")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers of the tutorial loop")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c, d")
    args = parser.parse_args(argv)
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    from lung_effnet.config import load_config

    device = torch.device(args.device)
    cfg = load_config(None, [f"data.image_size={args.size}", f"train.batch_size={args.batch}", "data.slices=all",
                             "model.pretrained_weights=null",
                             f"train.device={args.device}", "train.class_balance=sampler", "train.epochs=1"])
    results = {}
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        t0 = time.perf_counter()
        rows, files, labels = make_data(root, args)
        print(f"data: {len(files)} DICOM slices of {args.size}x{args.size} in {time.perf_counter() - t0:.0f} s", flush=True)
        skip = set(args.skip.split(","))
        if "a" not in skip:
            results["(a) model alone, bf16 + channels_last" if device.type == "cuda" else "(a) model alone"] = bench_model_alone(cfg, device, args, amp=True)
            if device.type == "cuda":
                results["(a') model alone, fp32"] = bench_model_alone(cfg, device, args, amp=False)
            print(results, flush=True)
        if "b" not in skip or "d" not in skip:
            trainer = project_trainer(cfg, rows, device, args, root / "cache")
            if "b" not in skip:
                results["(b) project loop from cache, aug on"] = bench_project_loop(trainer, device, args)
            if "d" not in skip:
                results["(d) project loop without the model (cache, sampling, aug, transfer)"] = bench_data_loop(trainer, device, args)
            print(results, flush=True)
        if "c" not in skip:
            results[f"(c) MONAI tutorial loop, DICOM, {args.workers} workers, fp32"] = bench_tutorial_loop(files, labels, device, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    from lung_effnet.console import format_table

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(format_table(["pipeline", "images/s"], [[k, f"{v:.0f}"] for k, v in results.items()],
                       f"EfficientNet-b0 training, {args.size} px, batch {args.batch}, {name}, torch {torch.__version__}"))
    a = next((v for k, v in results.items() if k.startswith("(a)")), None)
    b = next((v for k, v in results.items() if k.startswith("(b)")), None)
    c = next((v for k, v in results.items() if k.startswith("(c)")), None)
    if a and b:
        print(f"b / a = {b / a:.2f} (target >= 0.9)")
    if b and c:
        print(f"b / c = {b / c:.2f} (target >= 4)")
    d = next((v for k, v in results.items() if k.startswith("(d)")), None)
    if a and d:
        target = "> 10 on CPU" if device.type == "cpu" else "d > 3,304 images/s on the H200"
        print(f"d / a = {d / a:.1f} (target {target}: the data path must not be what limits training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a recipe learn or memorise? Per-epoch training accuracy against held-out AUROC, one fold.

Trains one fold of a patient-grouped k-fold split of slices saved by ``recipe_grid.py --export``
and prints, after every epoch, the training loss, the accuracy on the (unaugmented) training
slices and the macro AUROC on the held-out patients. The held-out fold is used for reporting only,
never for model selection (early stopping is off). ``--running-bn`` evaluates with BatchNorm's running averages instead of
statistics re-estimated with the current weights (what the project did before).

    python benchmarks/learning_curve.py --slices slices.pt [--fold 0] [--set train.epochs=30 ...]
    python benchmarks/learning_curve.py --disks [--running-bn]

``--disks`` replaces the phantoms by an easy task of 240 training and 120 held-out 64 px noise
images (a small bright disk, a large one, or none), each image its own patient: any recipe that
works learns it within an epoch or two.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F


def disk_task(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, size, size)`` float16 noise images and labels: 0 a small disk, 1 a large one, 2 none."""
    x = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 3, n)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(y < 2):
        cy, cx = rng.integers(12, size - 12, 2)
        x[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= (3 if y[i] == 0 else 7) ** 2] = 0.8
    return torch.from_numpy(x.clip(0, 1)).half(), torch.from_numpy(y)


def load_task(args, cfg) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, train_idx, test_idx)`` for ``--slices`` (one fold of a grouped split) or ``--disks``."""
    from lung_effnet.splits import assign_folds

    if args.disks:
        rng = np.random.default_rng(cfg.seed)
        (x_train, y_train), (x_test, y_test) = disk_task(240, 64, rng), disk_task(120, 64, rng)
        labels = torch.cat([y_train, y_test]).numpy()
        return torch.cat([x_train, x_test]), labels, np.arange(240), np.arange(240, 360)
    blob = torch.load(args.slices, weights_only=False)
    images = blob["images"]
    if cfg.data.image_size != blob["size"]:
        images = F.interpolate(images.float(), size=(cfg.data.image_size,) * 2, mode="area").half()
    labels, groups = blob["labels"].numpy(), np.array(blob["groups"])
    fold_of = assign_folds(labels, groups, args.folds, cfg.seed)
    return images, labels, np.flatnonzero(fold_of != args.fold), np.flatnonzero(fold_of == args.fold)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--slices", help="a file written by recipe_grid.py --export")
    task.add_argument("--disks", action="store_true", help="the easy disk task instead (see above)")
    parser.add_argument("--config", default="demo_cpu")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--running-bn", action="store_true",
                        help="evaluate with BatchNorm running averages (no recalibration before each evaluation)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    from lung_effnet.config import load_config
    from lung_effnet.evaluate import classification_metrics
    from lung_effnet.predictor import build_member
    from lung_effnet.train import FoldData, FoldTrainer, predict_proba

    extra = ["data.image_size=64"] if args.disks else []
    cfg = load_config(args.config, extra + args.set + ["train.early_stopping_patience=100000", "train.val_fraction=0.0"])
    images, labels, train_idx, test_idx = load_task(args, cfg)
    y = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    print(f"{len(train_idx)} training images, {len(test_idx)} held-out images; BatchNorm statistics: "
          f"{'running averages' if args.running_bn else 'recalibrated before each evaluation'}")
    print("epoch  train loss  train acc  held-out AUROC  s")
    with tempfile.TemporaryDirectory() as tmp:
        data = FoldData(images[train_idx], y[train_idx], images[:0], y[:0])
        trainer = FoldTrainer(build_member(cfg), data, cfg, os.path.join(tmp, "fold"), cfg.seed)

        def on_epoch(epoch: int, record: dict) -> None:
            if not args.running_bn:
                trainer.recalibrate()
            train_acc = (predict_proba(trainer.model, images[train_idx]).argmax(1) == labels[train_idx]).mean()
            auroc = classification_metrics(labels[test_idx], predict_proba(trainer.model, images[test_idx]))["auroc_macro"]
            print(f"{epoch:5d}  {record['train_loss']:10.3f}  {train_acc:9.3f}  {auroc:14.3f}  {time.perf_counter() - start:.0f}",
                  flush=True)

        trainer.fit(on_epoch=on_epoch, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

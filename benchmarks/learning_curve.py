"""Does a recipe learn or memorise? Per-epoch training accuracy against held-out AUROC, one fold.

Trains one fold of a patient-grouped k-fold split of slices saved by ``recipe_grid.py --export``
and prints, after every epoch, the training loss, the accuracy on the (unaugmented) training
slices and the macro AUROC on the held-out patients. The held-out fold is used for reporting only,
never for model selection (early stopping is off).

    python benchmarks/learning_curve.py --slices slices.pt [--fold 0] [--set train.epochs=30 ...]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", required=True, help="a file written by recipe_grid.py --export")
    parser.add_argument("--config", default="demo_cpu")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override, repeatable")
    args = parser.parse_args(argv)
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    from lung_effnet.config import load_config
    from lung_effnet.evaluate import classification_metrics
    from lung_effnet.predictor import build_member
    from lung_effnet.splits import assign_folds
    from lung_effnet.train import FoldData, FoldTrainer, predict_proba

    cfg = load_config(args.config, args.set + ["train.early_stopping_patience=100000", "train.val_fraction=0.0"])
    blob = torch.load(args.slices, weights_only=False)
    images = blob["images"]
    if cfg.data.image_size != blob["size"]:
        images = F.interpolate(images.float(), size=(cfg.data.image_size,) * 2, mode="area").half()
    labels, groups = blob["labels"].numpy(), np.array(blob["groups"])
    fold_of = assign_folds(labels, groups, args.folds, cfg.seed)
    train_idx, test_idx = np.flatnonzero(fold_of != args.fold), np.flatnonzero(fold_of == args.fold)
    y = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    print(f"fold {args.fold}: {len(train_idx)} training slices, {len(test_idx)} held-out slices "
          f"({len(set(groups[test_idx]))} patients)")
    print("epoch  train loss  train acc  held-out AUROC  s")
    with tempfile.TemporaryDirectory() as tmp:
        data = FoldData(images[train_idx], y[train_idx], images[:0], y[:0])
        trainer = FoldTrainer(build_member(cfg), data, cfg, os.path.join(tmp, "fold"), cfg.seed)

        def on_epoch(epoch: int, record: dict) -> None:
            train_acc = (predict_proba(trainer.model, images[train_idx]).argmax(1) == labels[train_idx]).mean()
            auroc = classification_metrics(labels[test_idx], predict_proba(trainer.model, images[test_idx]))["auroc_macro"]
            print(f"{epoch:5d}  {record['train_loss']:10.3f}  {train_acc:9.3f}  {auroc:14.3f}  {time.perf_counter() - start:.0f}",
                  flush=True)

        trainer.fit(on_epoch=on_epoch, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

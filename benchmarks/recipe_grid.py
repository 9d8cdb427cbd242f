"""Which from-scratch training recipe learns on small phantom data? Cross-validated, side by side.

Loads preprocessed slices saved by ``--export`` (from any lung-effnet source, through the cache),
then runs a patient-grouped k-fold CV for each recipe (a list of config overrides) and prints
out-of-fold AUROCs. The first recipe is the MONAI-tutorial loop (Adam 1e-3, MONAI defaults, no
augmentation, no class balancing, 8 epochs); the others are the project's recipe and ablations.

    python benchmarks/recipe_grid.py --export DATA --labels LABELS.csv --out slices.pt --size 128
    python benchmarks/recipe_grid.py --slices slices.pt --device cuda [--folds 3] [--recipes a,b]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TUTORIAL = ["train.channels_last=false", "model.bn_momentum=0.01", "model.zero_init_head=false", "model.drop_connect=0.2", "train.optimizer=adam",
            "train.lr=0.001", "train.weight_decay=0.0", "train.scheduler=none", "train.warmup_epochs=0",
            "train.class_balance=none", "train.val_fraction=0.0", "augment.prob=0.0", "augment.flip_prob=0.0",
            "augment.noise_std=0.0", "train.epochs=8", "train.bn_recalibration_images=0"]
PROJECT = ["train.lr=0.0003", "train.label_smoothing=0.1", "model.drop_connect=0.0", "train.val_fraction=0.15"]
RECIPES = {
    "tutorial-8ep": TUTORIAL,
    "project-8ep": PROJECT + ["train.epochs=8"],
    "project-30ep": PROJECT + ["train.epochs=30"],
    "project-30ep-96px": PROJECT + ["train.epochs=30", "data.image_size=96"],
    "project-30ep-64px": PROJECT + ["train.epochs=30", "data.image_size=64"],
    "project-30ep-lr1e-3": PROJECT + ["train.epochs=30", "train.lr=0.001"],
    "project-30ep-bn0.01": PROJECT + ["train.epochs=30", "model.bn_momentum=0.01"],
    "project-30ep-randhead": PROJECT + ["train.epochs=30", "model.zero_init_head=false"],
    "project-30ep-noaug": PROJECT + ["train.epochs=30", "augment.prob=0.0", "augment.flip_prob=0.0", "augment.noise_std=0.0"],
    "project-30ep-dc0.2": PROJECT + ["train.epochs=30", "model.drop_connect=0.2"],
    "project-30ep-runningbn": PROJECT + ["train.epochs=30", "train.bn_recalibration_images=0"],
    # CPU-sized: what the demo can afford on 2 cores
    "project-12ep-64px": PROJECT + ["train.epochs=12", "data.image_size=64"],
    "project-12ep-64px-lr1e-3": PROJECT + ["train.epochs=12", "data.image_size=64", "train.lr=0.001"],
    "tutorial-8ep-64px": TUTORIAL + ["data.image_size=64"],
    "project-15ep-96px": PROJECT + ["train.epochs=15", "data.image_size=96"],
    "project-15ep-96px-lr1e-3": PROJECT + ["train.epochs=15", "data.image_size=96", "train.lr=0.001"],
    "project-15ep-96px-noval": PROJECT + ["train.epochs=15", "data.image_size=96", "train.val_fraction=0.0"],
    "project-15ep-96px-max": PROJECT + ["train.epochs=15", "data.image_size=96", "model.pooling=max"],
    "project-15ep-96px-max-lr1e-3": PROJECT + ["train.epochs=15", "data.image_size=96", "model.pooling=max", "train.lr=0.001"],
    "project-10ep-96px-max": PROJECT + ["train.epochs=10", "data.image_size=96", "model.pooling=max"],
    "project-15ep-96px-max-noval": PROJECT + ["train.epochs=15", "data.image_size=96", "model.pooling=max", "train.val_fraction=0.0"],
    "project-12ep-96px-max-noval": PROJECT + ["train.epochs=12", "data.image_size=96", "model.pooling=max", "train.val_fraction=0.0"],
    "project-15ep-96px-noval-lr1e-3": PROJECT + ["train.epochs=15", "data.image_size=96", "train.val_fraction=0.0", "train.lr=0.001"],
    "demo-cpu": ["train.epochs=15", "data.image_size=96", "train.val_fraction=0.0", "train.lr=0.001",
                 "train.label_smoothing=0.1", "model.drop_connect=0.0"],
    "project-15ep-96px-noval-2.5d": PROJECT + ["train.epochs=15", "data.image_size=96", "train.val_fraction=0.0", "data.context_slices=1"],
}


def export(data: str, labels: str | None, out: str, size: int, context: int = 0, overrides=()) -> None:
    from lung_effnet.config import load_config
    from lung_effnet.ingest.sources import ingest
    from lung_effnet.preprocess.cache import build_sample_set

    cfg = load_config(None, [f"data.image_size={size}", f"data.context_slices={context}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(data, Path(tmp) / "ingest", labels_csv=labels, progress=False)
        cache = Path(os.environ.get("LUNG_EFFNET_CACHE_DIR", Path(tmp) / "cache"))
        samples = build_sample_set(result.rows, cfg.data, cache, progress=True)
    torch.save({"images": samples.images, "labels": torch.from_numpy(samples.labels), "groups": list(samples.patient_ids),
                "size": size, "masks": samples.masks, "mask_known": torch.from_numpy(samples.mask_known)}, out)
    print(f"wrote {len(samples)} slices ({np.bincount(samples.labels, minlength=3).tolist()} per class) to {out}")


def run_recipe(name: str, overrides: list[str], blob: dict, folds: int, device: str, seed: int) -> dict:
    import torch.nn.functional as F

    from lung_effnet.config import load_config
    from lung_effnet.models.predictor import build_member
    from lung_effnet.training.fold import FoldData, FoldTrainer, predict_proba
    from lung_effnet.training.metrics import classification_metrics
    from lung_effnet.training.splits import assign_folds, inner_validation_split

    cfg = load_config(None, overrides + [f"train.device={device}", f"seed={seed}"])
    images = blob["images"]
    if cfg.data.image_size != blob["size"]:
        images = F.interpolate(images.float(), size=(cfg.data.image_size,) * 2, mode="area").half()
    labels, patient_ids = blob["labels"].numpy(), np.array(blob["groups"])
    fold_of = assign_folds(labels, patient_ids, folds, seed)
    oof = np.zeros((len(labels), 3))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(folds):
            train_idx, test_idx = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
            tr, va = inner_validation_split(labels[train_idx], patient_ids[train_idx], cfg.train.val_fraction, seed + k)
            tr, va = train_idx[tr], train_idx[va]
            y = torch.from_numpy(labels)
            torch.manual_seed(seed * 1000 + k)
            trainer = FoldTrainer(build_member(cfg), FoldData(images[tr], y[tr], images[va], y[va]), cfg,
                                  Path(tmp) / f"{name}_{k}", seed * 1000 + k)
            trainer.fit(progress=False)
            oof[test_idx] = predict_proba(trainer.model, images[test_idx])
    m = classification_metrics(labels, oof)
    return {"recipe": name, "auroc_macro": m["auroc_macro"], "auroc_benign": m["auroc_benign"],
            "auroc_malignant": m["auroc_malignant"], "auroc_normal": m["auroc_normal"],
            "balanced_accuracy": m["balanced_accuracy"], "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="a lung-effnet source to preprocess and save")
    parser.add_argument("--labels", help="labels CSV for --export")
    parser.add_argument("--out", default="slices.pt")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--context", type=int, default=0, help="--export: 1 for 2.5D (3 channels)")
    parser.add_argument("--slices", help="a file written by --export")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each recipe runs once per seed")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--set", action="append", default=[],
                        help="extra override for every recipe (with --export: for the preprocessing, e.g. data.crop=body)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    if args.export:
        export(args.export, args.labels, args.out, args.size, args.context, args.set)
        return 0
    from lung_effnet.console import format_table

    blob = torch.load(args.slices, weights_only=False)
    rows = []
    for name in args.recipes.split(","):
        for seed in map(int, args.seeds.split(",")):
            r = run_recipe(name, RECIPES[name] + args.set, blob, args.folds, args.device, seed)
            rows.append([r["recipe"], seed] + [f"{r[k]:.3f}" for k in ("auroc_macro", "auroc_benign", "auroc_malignant",
                                                                      "auroc_normal", "balanced_accuracy")] + [f"{r['seconds']:.0f}"])
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(format_table(["recipe", "seed", "AUROC macro", "benign", "malignant", "normal", "bal. acc", "s"], rows,
                       f"Out-of-fold, {args.folds}-fold patient-grouped CV, {len(blob['labels'])} slices, {device}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a recipe learn or memorise? Per-epoch training accuracy against held-out AUROC, one fold.

Trains one fold (or, with ``--all-folds``, every fold) of a patient-grouped k-fold split of slices
saved by ``recipe_grid.py --export`` and prints, after every epoch, the training loss, the accuracy
on the (unaugmented) training slices and the held-out AUROCs, macro and per class (pooled over the
folds' held-out patients with ``--all-folds``). The held-out fold is used for reporting only,
never for model selection (early stopping is off). ``--running-bn`` evaluates with BatchNorm's running averages instead of
statistics re-estimated with the current weights (what the project did before).

    python benchmarks/learning_curve.py --slices slices.pt [--fold 0] [--set train.epochs=30 ...]
    python benchmarks/learning_curve.py --slices slices.pt --folds 5 --all-folds [--patients 40]
    python benchmarks/learning_curve.py --slices many1.pt many2.pt --test-slices demo.pt   # train on one set, test on another
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


def load_images(args, cfg) -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """``(images, labels, patient_ids, masks, mask_known)`` of ``--slices`` (several files are stacked, their
    patients kept apart; ``--test-slices`` is appended last), resized to ``data.image_size``, optionally
    a subset of ``--patients``; masks when the exports have them. ``--disks``: 240 training images,
    then 120 held out."""
    if args.disks:
        rng = np.random.default_rng(cfg.seed)
        (x_train, y_train), (x_test, y_test) = disk_task(240, 64, rng), disk_task(120, 64, rng)
        labels = torch.cat([y_train, y_test]).numpy()
        return torch.cat([x_train, x_test]), labels, np.array([f"d{i}" for i in range(len(labels))]), None, None
    parts = [_read_export(path, f"{i}:", cfg) for i, path in enumerate(args.slices)]
    if args.patients:
        images, labels, patient_ids, masks, known = parts[0]
        keep = patient_subset(labels, patient_ids, args.patients, cfg.seed)
        parts[0] = (images[keep], labels[keep], patient_ids[keep], None if masks is None else masks[keep],
                    None if known is None else known[keep])
    if args.test_slices:
        parts.append(_read_export(args.test_slices, "test:", cfg))
    images, labels, patient_ids, masks, known = zip(*parts)
    with_masks = all(m is not None for m in masks)
    return (torch.cat(images), np.concatenate(labels), np.concatenate(patient_ids),
            torch.cat(masks) if with_masks else None, torch.cat(known) if with_masks else None)


def _read_export(path: str, prefix: str, cfg):
    blob = torch.load(path, weights_only=False)
    images, masks = blob["images"], blob.get("masks")
    if cfg.data.image_size != blob["size"]:
        images = F.interpolate(images.float(), size=(cfg.data.image_size,) * 2, mode="area").half()
        if masks is not None:
            masks = (F.interpolate(masks.float(), size=(cfg.data.image_size,) * 2, mode="area") > 0.5).to(torch.uint8)
    patient_ids = np.array([prefix + str(g) for g in blob["groups"]])
    return images, blob["labels"].numpy(), patient_ids, masks, blob.get("mask_known")


def patient_subset(labels: np.ndarray, patient_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Row indices of ``n`` patients drawn in proportion to each class's patients."""
    rng = np.random.default_rng(seed)
    chosen = []
    patients = sorted(set(patient_ids))
    label_of = {g: labels[patient_ids == g][0] for g in patients}
    for cls in sorted(set(label_of.values())):
        members = [g for g in patients if label_of[g] == cls]
        take = round(n * len(members) / len(patients))
        chosen += list(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.flatnonzero(np.isin(patient_ids, chosen))


def split(args, cfg, labels, patient_ids, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` of one fold: a patient-grouped k-fold split, or the disks' fixed one."""
    from lung_effnet.training.splits import assign_folds

    if args.disks:
        return np.arange(240), np.arange(240, 360)
    if args.test_slices:
        test = np.char.startswith(patient_ids.astype(str), "test:")
        return np.flatnonzero(~test), np.flatnonzero(test)
    fold_of = assign_folds(labels, patient_ids, args.folds, cfg.seed)
    return np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)


def run_fold(cfg, images, labels, train_idx, test_idx, seed, running_bn, tmp, masks=None, known=None) -> list[dict]:
    """Train one fold of ``cfg.train.epochs``; after every epoch, the (unaugmented) training
    accuracy and the held-out probabilities ``(len(test_idx), 3)``."""
    from lung_effnet.training.cv import initial_member
    from lung_effnet.training.fold import FoldData, FoldTrainer, predict_proba

    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = initial_member(cfg)  # as train starts a fold: lesion finder and pretrained weights as configured
    data = FoldData(images[train_idx], y[train_idx], images[:0], y[:0], None if masks is None else masks[train_idx],
                    None if known is None else known[train_idx])
    trainer = FoldTrainer(model, data, cfg, os.path.join(tmp, f"fold{seed}"), seed)
    curve = []

    def on_epoch(epoch: int, record: dict) -> None:
        if not running_bn:
            trainer.recalibrate()
        train_acc = float((predict_proba(trainer.model, images[train_idx]).argmax(1) == labels[train_idx]).mean())
        curve.append({"loss": record["train_loss"], "train_acc": train_acc,
                      "proba": predict_proba(trainer.model, images[test_idx])})

    trainer.fit(on_epoch=on_epoch, progress=False)
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--slices", nargs="+", help="file(s) written by recipe_grid.py --export (several: stacked)")
    task.add_argument("--disks", action="store_true", help="the easy disk task instead (see above)")
    parser.add_argument("--config", default="demo_cpu")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--all-folds", action="store_true",
                        help="train every fold and report pooled out-of-fold AUROCs per epoch (what CV would report "
                             "had it stopped at that epoch)")
    parser.add_argument("--test-slices", help="train on all of --slices and test on this export instead of k folds")
    parser.add_argument("--patients", type=int, default=0,
                        help="--slices: use only this many patients (a seeded, class-stratified subset)")
    parser.add_argument("--set", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--running-bn", action="store_true",
                        help="evaluate with BatchNorm running averages (no recalibration before each evaluation)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LUNG_EFFNET_HASH_KEY", "benchmark")
    from lung_effnet.config import load_config
    from lung_effnet.training.metrics import classification_metrics

    extra = ["data.image_size=64"] if args.disks else []
    cfg = load_config(args.config, extra + args.set + ["train.early_stopping_patience=100000", "train.val_fraction=0.0"])
    images, labels, patient_ids, masks, known = load_images(args, cfg)
    cfg.data.context_slices = (images.shape[1] - 1) // 2  # the model takes the export's channels
    folds = [args.fold] if not args.all_folds or args.disks or args.test_slices else range(args.folds)
    start = time.perf_counter()
    curves, held_out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in folds:
            train_idx, test_idx = split(args, cfg, labels, patient_ids, k)
            curves.append(run_fold(cfg, images, labels, train_idx, test_idx, cfg.seed * 1000 + k, args.running_bn, tmp,
                                   masks, known))
            held_out.append(test_idx)
    test_idx = np.concatenate(held_out)
    print(f"{len(labels)} images of {len(set(patient_ids))} patients, {cfg.data.image_size} px, "
          f"{images.shape[1]} channel(s), lesion loss {'on' if known is not None and cfg.train.lesion_loss_weight > 0 else 'off'}; folds {list(folds)} ({len(test_idx)} held-out images); BatchNorm statistics: "
          f"{'running averages' if args.running_bn else 'recalibrated before each evaluation'}; "
          f"{time.perf_counter() - start:.0f} s")
    print("epoch  train loss  train acc  held-out AUROC macro  benign  malignant  normal")
    for epoch in range(len(curves[0])):
        proba = np.concatenate([c[epoch]["proba"] for c in curves])
        m = classification_metrics(labels[test_idx], proba)
        loss = np.mean([c[epoch]["loss"] for c in curves])
        acc = np.mean([c[epoch]["train_acc"] for c in curves])
        print(f"{epoch:5d}  {loss:10.3f}  {acc:9.3f}  {m['auroc_macro']:20.3f}  {m['auroc_benign']:6.3f}  "
              f"{m['auroc_malignant']:9.3f}  {m['auroc_normal']:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which pair of classes does a model tell apart? Pairwise AUROCs, for a training run or for weights as they are.

A class's one-vs-rest AUROC mixes its two confusions: a benign AUROC of 0.74 may mean "benign told
from malignant, not at all from normal". This prints Hand & Till's pairwise AUROCs
(``lung_effnet.training.metrics``) with patient-bootstrap 95% CIs, for

- a finished ``train`` run: its pooled out-of-fold predictions (``--run RUN``); with NIfTI lesion masks
  in its manifest (``mask_path``), also benign vs normal
  split by the size of the benign slice's lesion on that slice (equivalent diameter, mm; ``--by-size``);
- a weights file used as it is, no fine-tuning (``--weights W --data D``): e.g. what ``pretrain``
  taught before a study's patients adapt it.

    python benchmarks/pair_aurocs.py --run RUN [--by-size]
    python benchmarks/pair_aurocs.py --weights builtin:phantom-b0-96px-2.5d --data D [--labels L] [--set data.image_size=192]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.training.metrics import METRIC_NAMES, bootstrap_ci, classification_metrics

PAIR_KEYS = tuple(k for k in METRIC_NAMES if "_vs_" in k)
SIZE_BINS_MM = ((0, 4), (4, 6), (6, 8), (8, math.inf))


def report(name: str, y: np.ndarray, p: np.ndarray, patients: np.ndarray) -> None:
    """One line: macro and per-class (one-vs-rest) AUROC, then the three pairs with CIs."""
    m = classification_metrics(y, p)
    ci = bootstrap_ci(y, p, patients, n_boot=1000, seed=0)
    per_class = " / ".join(f"{m[f'auroc_{c}']:.3f}" for c in CLASSES)
    pairs = "; ".join(f"{k.removeprefix('auroc_').replace('_vs_', ' vs ')} {m[k]:.3f} ({ci[k][0]:.2f}-{ci[k][1]:.2f})"
                      for k in PAIR_KEYS)
    print(f"{name}: macro {m['auroc_macro']:.3f}, one-vs-rest {'/'.join(CLASSES)} {per_class} | {pairs}", flush=True)


def lesion_diameters(oof: list[dict], manifest: list[dict]) -> np.ndarray:
    """Per out-of-fold row, the equivalent diameter (mm) of its lesion mask on its slice, read as training
    reads it (``mask_plane``: canonical orientation, the mask rule of ``io.masks``); nan for rows that are
    not benign or have no NIfTI mask (a 2D mask has no pixel size)."""
    from lung_effnet.io.nifti import read_nifti
    from lung_effnet.preprocess.cache import mask_plane

    by_slice = {(r["path"], r["slice_index"]): r for r in manifest}
    pixel_mm2: dict[str, float] = {}
    out = np.full(len(oof), np.nan)
    for i, r in enumerate(oof):
        row = by_slice.get((r["path"], r["slice_index"]))
        mask_path = (row or {}).get("mask_path") or ""
        if r["label"] != "benign" or not mask_path.endswith((".nii", ".nii.gz")):
            continue
        if mask_path not in pixel_mm2:
            _, dy, dx = read_nifti(mask_path).spacing
            pixel_mm2[mask_path] = dy * dx
        plane = mask_plane(row)
        out[i] = 2 * np.sqrt(plane.sum() * pixel_mm2[mask_path] / np.pi)
    return out


def from_run(run: Path, by_size: bool) -> None:
    oof = list(csv.DictReader(open(run / "oof_predictions.csv")))
    y = np.array([CLASSES.index(r["label"]) for r in oof])
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in oof])
    patients = np.array([r["patient_id"] for r in oof])
    report(f"{run} (out of fold, {len(oof)} slices)", y, p, patients)
    if not by_size:
        return
    diameter = lesion_diameters(oof, list(csv.DictReader(open(run / "ingest" / "manifest.csv"))))
    if np.isnan(diameter[y == CLASSES.index("benign")]).all():
        print("  no benign slice has a NIfTI lesion mask in the run's manifest: no sizes")
        return
    for lo, hi in SIZE_BINS_MM:
        keep = (y == CLASSES.index("normal")) | ((diameter >= lo) & (diameter < hi))
        n = int(((y == CLASSES.index("benign")) & keep).sum())
        if n:
            pair = classification_metrics(y[keep], p[keep])["auroc_benign_vs_normal"]
            across = f"{lo}-{hi} mm" if math.isfinite(hi) else f"{lo} mm or more"
            print(f"  benign slices whose lesion is {across} across on the slice (n={n}) vs all normal slices: "
                  f"benign vs normal {pair:.3f}")


def from_weights(weights: str, data: Path, labels: Path | None, overrides: list[str]) -> None:
    from lung_effnet.config import from_dict, load_config, parse_override
    from lung_effnet.models.weight_files import resolve_weights
    from lung_effnet.training.cv import initial_member, prepare_samples

    # the settings the weights were pretrained under (pretrain.json beside them, or the built-in's .json), then --set
    resolved = resolve_weights(weights)
    record = next((f for f in (resolved.with_suffix(".json"), resolved.parent / "pretrain.json") if f.exists()), None)
    if record is None:
        print(f"  (no pretrain.json beside {resolved}: demo_cpu's settings, then --set)")
        cfg = load_config("demo_cpu", overrides)
    else:
        raw = json.loads(record.read_text())["config"]
        for text in overrides:
            key, value = parse_override(text)
            section, name = key.split(".")
            raw[section][name] = value
        cfg = from_dict(raw)
    # as train starts a fold: the finder the weights were pretrained with (pretrain.json's model.lesion_finder), then them
    model = initial_member(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_weights=weights)))
    model.eval()
    with tempfile.TemporaryDirectory() as work:
        samples, _ = prepare_samples(data, Path(work), cfg, labels, False)
    with torch.no_grad():
        logits = torch.cat([model(samples.images[i:i + 64].float()) for i in range(0, len(samples.images), 64)])
    p = torch.softmax(logits, 1).numpy()
    report(f"{weights} as it is on {data} ({len(p)} slices, {cfg.data.image_size} px)", samples.labels, p, samples.patient_ids)
    # how much the model's benign:normal odds move at all from slice to slice (0: a constant split)
    b, m, n = (CLASSES.index(c) for c in ("benign", "malignant", "normal"))
    print(f"  logit(benign) - logit(normal): SD {(logits[:, b] - logits[:, n]).std().item():.4f} over all slices; "
          f"logit(malignant) - logit(normal): SD {(logits[:, m] - logits[:, n]).std().item():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a train output folder (oof_predictions.csv, ingest/manifest.csv)")
    ap.add_argument("--by-size", action="store_true",
                    help="with --run: benign vs normal by the benign lesion's size on its slice (NIfTI lesion masks)")
    ap.add_argument("--weights", help="a weights file or builtin:<name>, evaluated without fine-tuning on --data")
    ap.add_argument("--data", type=Path, help="with --weights: the source, a folder or a manifest CSV")
    ap.add_argument("--labels", type=Path, help="with --weights: labels CSV (default: DATA/labels.csv when it exists)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --weights: override the settings the weights were pretrained under (pretrain.json)")
    args = ap.parse_args()
    if (args.run is None) == (args.weights is None):
        ap.error("give exactly one of --run and --weights")
    if args.run is not None:
        if args.data or args.labels or args.set:
            ap.error("--data, --labels and --set go with --weights; a run knows its data")
        from_run(args.run, args.by_size)
    else:
        if args.by_size:
            ap.error("--by-size goes with --run")
        if args.data is None:
            ap.error("--weights needs --data")
        labels = args.labels or (args.data / "labels.csv" if (args.data / "labels.csv").exists() else None)
        from_weights(args.weights, args.data, labels, args.set)


if __name__ == "__main__":
    main()

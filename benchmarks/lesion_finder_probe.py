"""Is a benign nodule in the classifier's input at all? A probe: a small lesion finder on the same tensors.

The classifier tells benign slices from normal ones at chance (RESULTS.md, eleventh session). That can mean
the nodule is not in its 96 px input (too few pixels among the vessels), or that the input holds it and the
classifier does not learn to find it. This trains a small fully convolutional network (no downsampling,
dilated 3 x 3 convolutions, a receptive field of 33 px: 90 mm at the demo's ~2.8 mm a pixel) to mark
lesion pixels in the project's own preprocessed inputs (``prepare_samples``: lung crop, window, 2.5D,
``--set`` as ``train``), from the lesion masks of a phantom set it learns on, then scores other sets' slices
by the map's maximum:

- **benign vs normal AUROC of that score** (patient-bootstrap 95% CI), on slices of patients it never saw;
- with a finished ``train`` run of the same source (``SOURCE@RUN``): that run's own benign vs normal, and a
  stacked estimate, a patient-grouped 5-fold multinomial logistic regression on the run's out-of-fold logit
  differences plus the finder's score (macro and malignant AUROC, benign vs normal), beside the same
  stacking without the finder (what re-fitting alone does). That is an estimate of what a classifier that
  also read the finder could reach, not a pipeline result.

Supervision: ``masks`` (default; dense loss on 32 x 32 crops, half of them on a lesion, positives weighted
5x) or ``slice`` (multiple-instance: the map's smooth maximum against "this slice holds a lesion", whole
slices, no masks: what a study without masks could train). ``--flat P``: with probability P a training
crop's context channels all repeat its centre slice, as they do for a 2D source (a JPG has no neighbours).
``--save F`` keeps the finder's weights (folded, as ``pretrain`` writes them: a ``model.lesion_finder`` file).

    lung-effnet synth PRE --format nifti --patients 480 --seed 1000 --size 512 --slices 6
    python benchmarks/lesion_finder_probe.py --train PRE --eval DEMO0@RUN0 --eval FAMILY/manifest.csv@RUNB
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from torch import nn

from lung_effnet.classes import CLASSES
from lung_effnet.models.lesion_finder import finder_network
from lung_effnet.training.finder_training import augment_crops, train_lesion_finder
from lung_effnet.training.metrics import bootstrap_ci, classification_metrics

BENIGN, MALIGNANT, NORMAL = (CLASSES.index(c) for c in ("benign", "malignant", "normal"))


def samples_of(source: Path, cfg, work: Path):
    from lung_effnet.training.cv import prepare_samples

    labels = source / "labels.csv" if source.is_dir() and (source / "labels.csv").exists() else None
    samples, _ = prepare_samples(source, work, cfg, labels, False)
    return samples


def train_finder(x: torch.Tensor, m: torch.Tensor, steps: int, width: int, supervision: str, flat: float,
                 batch: int, seed: int) -> nn.Module:
    """x: ``(N, C, S, S)`` inputs in [0, 1]; m: ``(N, 1, S, S)`` lesion masks (0/1). ``masks``: the package's own
    trainer (``train_lesion_finder``, what ``pretrain`` runs); ``slice``: the same network and augmentation on
    whole slices, its map's smooth maximum against "this slice holds a lesion"."""
    if supervision == "masks":
        return train_lesion_finder(x, m, steps, batch, flat, seed, width=width, progress=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = finder_network(x.shape[1], width)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    has_lesion = m.flatten(1).amax(1) > 0
    lesion, other = np.flatnonzero(has_lesion.numpy()), np.flatnonzero(~has_lesion.numpy())
    start = time.perf_counter()
    for step in range(steps):
        rows = np.concatenate([rng.choice(lesion, batch // 2), rng.choice(other, batch - batch // 2)])
        xb, mb = augment_crops(x[rows], m[rows], flat, rng)
        flat_logits = net(xb).flatten(1)  # smooth maximum over the map (log-sum-exp at temperature 1/4)
        score = (torch.logsumexp(4 * flat_logits, 1) - np.log(flat_logits.shape[1])) / 4
        loss = F.binary_cross_entropy_with_logits(score, (mb.flatten(1).amax(1) > 0).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return net.eval()


@torch.no_grad()
def slice_scores(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``(N,)`` the finder's maximum lesion probability over each slice."""
    return np.concatenate([torch.sigmoid(net(x[i:i + 64].float())).flatten(1).amax(1).numpy()
                           for i in range(0, len(x), 64)])


def as_benign_probability(score: np.ndarray) -> np.ndarray:
    """A score as ``(N, 3)`` pseudo-probabilities (benign s, malignant 0, normal 1 - s), so that the project's
    bootstrap gives its benign vs normal AUROC and CI (both of that pair's rankings are the score's)."""
    return np.column_stack([score, np.zeros_like(score), 1 - score])


def stacked(y: np.ndarray, proba: np.ndarray, score: np.ndarray | None, patients: np.ndarray) -> np.ndarray:
    """Out-of-fold ``(N, 3)`` of a patient-grouped 5-fold logistic regression on the run's logit differences
    (benign - normal, malignant - normal) and, unless ``score`` is None, the finder's logit (without it: what
    the stacking alone costs or gives)."""
    logp = np.log(np.clip(proba, 1e-6, 1))
    columns = [logp[:, BENIGN] - logp[:, NORMAL], logp[:, MALIGNANT] - logp[:, NORMAL]]
    if score is not None:
        s = np.clip(score, 1e-6, 1 - 1e-6)
        columns.append(np.log(s) - np.log1p(-s))
    features = np.column_stack(columns)
    out = np.zeros_like(proba)
    for train, test in GroupKFold(5).split(features, y, patients):
        out[test] = LogisticRegression(C=0.1, max_iter=2000).fit(features[train], y[train]).predict_proba(features[test])
    return out


def evaluate(net: nn.Module, spec: str, cfg, work: Path) -> str:
    source, _, run = spec.partition("@")
    samples = samples_of(Path(source), cfg, work / f"eval_{abs(hash(spec))}")
    y, patients = samples.labels, samples.patient_ids
    score = slice_scores(net, samples.images)
    keep = y != MALIGNANT
    ci = bootstrap_ci(y[keep], as_benign_probability(score[keep]), patients[keep], n_boot=1000, seed=0)
    bvn = classification_metrics(y[keep], as_benign_probability(score[keep]))["auroc_benign_vs_normal"]
    lo, hi = ci["auroc_benign_vs_normal"]
    line = f"| {source} | {bvn:.3f} ({lo:.2f}-{hi:.2f}) |"
    if not run:
        return line + " - | - | - |"
    import pandas as pd

    oof = pd.read_csv(Path(run) / "oof_predictions.csv")
    if len(oof) != len(y) or (oof.label.map(CLASSES.index).to_numpy() != y).any():
        raise SystemExit(f"{run}: its out-of-fold rows are not {source}'s samples in order")
    proba = oof[[f"p_{c}" for c in CLASSES]].to_numpy()
    own = classification_metrics(y, proba)
    alone = classification_metrics(y, stacked(y, proba, None, oof.patient_id.to_numpy()))
    mix = classification_metrics(y, stacked(y, proba, score, oof.patient_id.to_numpy()))
    return (line + f" macro {own['auroc_macro']:.3f}, benign vs normal {own['auroc_benign_vs_normal']:.3f} |"
            f" macro {alone['auroc_macro']:.3f} | macro {mix['auroc_macro']:.3f}, malignant {mix['auroc_malignant']:.3f},"
            f" benign vs normal {mix['auroc_benign_vs_normal']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", type=Path, help="a phantom set with lesion masks (folder with labels.csv)")
    source.add_argument("--load", metavar="FINDER", help="score with a finder file instead (a model.lesion_finder "
                                                         "value: builtin:<name> or a path, e.g. pretrain's lesion_finder.pt)")
    ap.add_argument("--eval", action="append", required=True, metavar="SOURCE[@RUN]",
                    help="a source to score (folder or manifest CSV), optionally with a finished train run of it")
    ap.add_argument("--config", default="demo_cpu", help="the preprocessing settings (default: demo_cpu)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as train's")
    ap.add_argument("--supervision", choices=("masks", "slice"), default="masks")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=32, help="channels of the finder's inner layers")
    ap.add_argument("--flat", type=float, default=0.0, help="share of training crops given a 2D source's flat context")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="write the trained finder's state dict here (a model.lesion_finder file)")
    args = ap.parse_args()
    from lung_effnet.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        net = load_finder_file(args.load, cfg) if args.load else trained_finder(args, cfg, work)
        print("| source | finder alone: benign vs normal (95% CI) | the run as it is | run, stacked | run + finder, stacked |")
        print("|---|---|---|---|---|")
        for spec in args.eval:
            print(evaluate(net, spec, cfg, work), flush=True)


def load_finder_file(name: str, cfg) -> nn.Module:
    """The finder in a ``model.lesion_finder`` file, as a fold model of ``cfg`` would hold it."""
    from lung_effnet.models.lesion_finder import finder_of, load_finder
    from lung_effnet.models.predictor import build_member

    member = build_member(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lesion_finder=name)))
    load_finder(member, name)
    return finder_of(member).eval()


def trained_finder(args, cfg, work: Path) -> nn.Module:
    """A finder trained on ``args.train``'s masks as ``args`` say (saved to ``args.save`` when given)."""
    pre = samples_of(args.train, cfg, work / "train")
    known = pre.mask_known if pre.mask_known is not None else np.zeros(len(pre.labels), bool)
    if not np.asarray(known).any():
        raise SystemExit(f"{args.train}: no lesion masks (mask_path) to learn from")
    rows = torch.from_numpy(np.flatnonzero(np.asarray(known)))
    x, m = pre.images[rows].float(), pre.masks[rows].float()
    print(f"training the finder on {len(rows)} slices of {args.train} ({int((m.flatten(1).amax(1) > 0).sum())} with "
          f"a lesion), {cfg.data.image_size} px, supervision {args.supervision}, {args.steps} steps", flush=True)
    start = time.perf_counter()
    net = train_finder(x, m, args.steps, args.width, args.supervision, args.flat, args.batch, args.seed)
    print(f"trained in {time.perf_counter() - start:.0f} s\n")
    if args.save:
        torch.save(net.state_dict(), args.save)
    return net


if __name__ == "__main__":
    main()

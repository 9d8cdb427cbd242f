"""The ``pretrain`` stage: one EfficientNet trained on many synthetic phantom patients, saved as the
initialisation ``train`` starts from (``model.pretrained_weights``).

Why: from scratch, an EfficientNet trained on the ~50 patients of a small study fits each patient's
anatomy (global, and different for every patient) long before it finds a lesion that covers a few
percent of the slice; its held-out AUROC stays at chance however long it trains, at any input size
we could afford on CPU. The same recipe on 480 phantom patients learns the lesions (held-out macro
AUROC 0.84 on 60 new patients after 9 epochs; benchmarks/RESULTS.md, "Why the classifier did not
learn"). Phantom patients cost nothing, so they are where the network learns what a nodule looks
like; a study's own patients then only have to adapt it.

With ``model.lesion_finder`` set (any value: the phantoms' masks are where a finder is learnt), a lesion
finder is trained first, from the masks (``training.finder_training``, ``lesion_finder.pt``), and the
model is then pretrained reading its map (``models.lesion_finder``): benign nodules that the classifier
alone tells from normal slices at chance become visible to it (benchmarks/RESULTS.md, twelfth session).

Products in ``out``: ``data/`` (the phantoms, NIfTI), ``ingest/``, ``lesion_finder.pt`` (the finder's
state dict ``model.lesion_finder`` loads), ``checkpoints/`` (resumable), ``weights.pt`` (the state dict
``model.pretrained_weights`` loads; without the finder's tensors) and ``pretrain.json`` (settings, data
fingerprint, per-epoch loss); one MLflow run (experiment ``<tracking.experiment>-pretrain``) with the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lung_effnet.config import Config
from lung_effnet.errors import InputError
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.finder_training import FINDER_STEPS, train_lesion_finder
from lung_effnet.version import __version__

log = logging.getLogger(__name__)

PRETRAIN_PATIENTS = 480
PRETRAIN_SLICES = 6
PRETRAIN_SEED = 1000
"""Phantom seeds 1000 + i: disjoint from the demo's seeds (0, 1, 2), so no pretraining patient is a
demo patient."""
PHANTOM_SIZE_PX = 512


def run_pretrain(out: str | Path, cfg: Config, n_patients: int = PRETRAIN_PATIENTS, seed: int = PRETRAIN_SEED,
                 tracking_uri: str | None = None, progress: bool = True, finder_steps: int = FINDER_STEPS) -> dict:
    """Write ``n_patients`` phantoms, preprocess them with ``cfg.data``, train the lesion finder (when
    ``model.lesion_finder`` is set) and one model from scratch with ``cfg.train`` / ``cfg.augment`` (lesion
    masks known: the auxiliary lesion loss is on), and save ``out/lesion_finder.pt`` and ``out/weights.pt``.
    ``model.pretrained_weights`` is not read: pretraining starts from random weights. Returns the content
    of ``pretrain.json``. ``finder_steps``: the finder's training batches.

    A run stopped part-way continues from its last epoch when started again with the same ``out``.
    """
    from lung_effnet.models.lesion_finder import FINDER_KEY_PREFIX, load_finder
    from lung_effnet.models.predictor import build_member
    from lung_effnet.tracking import CVTracker, run_tracking_uri
    from lung_effnet.training.cv import manifest_fingerprint, prepare_samples
    from lung_effnet.training.fold import FoldData, FoldTrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "mlflow_state.json"
    tracker = CVTracker(run_tracking_uri(state_file, tracking_uri, cfg.tracking.tracking_uri),
                        f"{cfg.tracking.experiment}-pretrain", state_file, cfg.tracking.timeout_s, cfg.tracking.retries)
    start = time.perf_counter()
    data = out / "data"
    if not (data / "synthetic.json").exists():
        write_synthetic_dataset(data, "nifti", n_patients=n_patients, seed=seed, size_px=PHANTOM_SIZE_PX,
                                n_slices=PRETRAIN_SLICES, progress=progress)
    samples, _ = prepare_samples(data, out, cfg, data / "labels.csv", progress)
    params = {**cfg.flat(), "pretrain.patients": n_patients, "pretrain.seed": seed, "pretrain.finder_steps": finder_steps,
              "pretrain.slices": len(samples), "pretrain.phantom_size_px": PHANTOM_SIZE_PX}
    with tracker.ending_runs_on_error():  # a failure ends the run FAILED (KILLED on Ctrl-C), not RUNNING
        run_id = tracker.parent("pretrain", params, {"stage": "pretrain", "code_version": __version__,
                                                     "data_fingerprint": manifest_fingerprint(samples.rows)})
        finder_file, finder_seconds = None, 0.0
        if cfg.model.lesion_finder is not None:
            finder_file, finder_seconds = out / "lesion_finder.pt", time.perf_counter()
            if not finder_file.exists():  # a resumed run keeps the finder it trained
                train_finder_file(finder_file, samples, seed, finder_steps, lambda step, loss: tracker.log_metrics(
                    run_id, {"finder_loss": loss}, step=step), progress)
            finder_seconds = time.perf_counter() - finder_seconds
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lesion_finder=str(finder_file)))
        torch.manual_seed(seed)
        y = torch.from_numpy(samples.labels)
        fold = FoldData(samples.images, y, samples.images[:0], y[:0], samples.masks,
                        torch.from_numpy(samples.mask_known))
        model = build_member(cfg)
        if finder_file is not None:
            load_finder(model, finder_file)
        trainer = FoldTrainer(model, fold, cfg, out / "checkpoints", seed)
        result = trainer.fit(on_epoch=lambda epoch, rec: tracker.log_metrics(run_id, rec, step=epoch), progress=progress)
        weights = out / "weights.pt"
        state = {k: v.cpu() for k, v in trainer.model.state_dict().items() if not k.startswith(FINDER_KEY_PREFIX)}
        torch.save(state, weights.with_suffix(".tmp"))
        weights.with_suffix(".tmp").replace(weights)
        summary = {
            "weights": str(weights), "lesion_finder": str(finder_file) if finder_file else None,
            "finder_seconds": round(finder_seconds, 1), "patients": n_patients, "seed": seed, "slices": len(samples),
            "per_class_slices": np.bincount(samples.labels, minlength=3).tolist(),
            "data_fingerprint": manifest_fingerprint(samples.rows), "epochs": result["epochs_run"],
            "train_loss": [round(h["train_loss"], 4) for h in result["history"]],
            "config": cfg.to_dict(), "seconds": round(time.perf_counter() - start, 1), "lung_effnet_version": __version__,
            "mlflow": {"tracking_uri": tracker.uri, "run_id": run_id},
        }
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifacts(run_id, [out / "pretrain.json", weights] + ([finder_file] if finder_file else []), "pretrain")
        tracker.finish(run_id)
    log.info("pretrained weights: %s (%d slices, %.0f s)", weights, len(samples), summary["seconds"])
    return summary


def train_finder_file(path: Path, samples, seed: int, steps: int, on_step, progress: bool) -> None:
    """Train the lesion finder on the rows of ``samples`` whose mask is known and save its folded state dict
    at ``path`` (written whole or not at all)."""
    known = np.flatnonzero(np.asarray(samples.mask_known)) if samples.mask_known is not None else np.zeros(0, int)
    if not len(known):
        raise InputError("no lesion masks among the pretraining slices: the lesion finder learns from masks "
                         "(--set model.lesion_finder=null pretrains without one)")
    rows = torch.from_numpy(known)
    finder = train_lesion_finder(samples.images[rows].float(), samples.masks[rows].float(), steps=steps, seed=seed,
                                 on_step=on_step, progress=progress)
    torch.save(finder.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    log.info("lesion finder: %s (%d slices with a known mask)", path, len(rows))

"""Patient-grouped cross-validation, end to end: the ``train`` stage.

source -> ingest (manifest) -> preprocessed tensors (cache) -> folds (+ leakage audit) -> one
model per fold (early stopping on inner validation patients) -> out-of-fold predictions ->
metrics with patient-bootstrap CIs -> model directory + MLflow (parent run, nested fold runs,
the fold ensemble as one logged model).

Every product is a file in ``out_dir``, and every fold's randomness derives from (seed, fold)
alone, so ``--resume`` after a crash skips finished folds, continues the interrupted one from its
last epoch, and ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.config import Config
from lung_effnet.errors import InputError, ManifestError, RunExistsError
from lung_effnet.ingest.sources import NO_PATIENT_IDS, ingest
from lung_effnet.io.ledger import write_csv
from lung_effnet.models.predictor import FoldEnsemble, Predictor, build_member, save_model_dir
from lung_effnet.preprocess.cache import SampleSet, build_sample_set, default_cache_dir
from lung_effnet.tracking import CVTracker, run_tracking_uri
from lung_effnet.training.fold import FoldData, FoldTrainer, load_best_state, load_fold_file, predict_proba
from lung_effnet.training.metrics import bootstrap_ci, classification_metrics, confusion
from lung_effnet.training.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, save_figure
from lung_effnet.training.splits import TEST_FOLD, assign_folds, audit_folds, inner_validation_split, write_folds_csv
from lung_effnet.version import __version__

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_benign", "auroc_malignant", "auroc_normal",
                   "auroc_macro", "ece")
OOF_COLUMNS = ("path", "patient_id", "fold", "label", "p_benign", "p_malignant", "p_normal", "slice_index", "series_uid")


def code_version() -> str:
    """Package version, plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def manifest_fingerprint(rows: list[dict]) -> str:
    """Digest of the manifest content (paths, labels, patients, slices): names the data version."""
    text = "\n".join(sorted(f"{r['path']}|{r['label']}|{r['patient_id']}|{r.get('slice_index', '')}" for r in rows))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class CVRun:
    """What a CV run needs while it runs (built once by ``run_cv``)."""

    cfg: Config
    out: Path
    samples: SampleSet
    folds: np.ndarray
    tracker: CVTracker
    parent_id: str


def prepare_samples(source: Path, out: Path, cfg: Config, labels_csv: Path | None, progress: bool) -> tuple[SampleSet, list[str]]:
    # the run's outputs are not inputs when --out lies inside the source; a source inside --out (pretrain
    # writes its phantoms to <out>/data) is read whole: the walk of it never reaches the outputs
    inside_out = Path(source).resolve().is_relative_to(Path(out).resolve())
    result = ingest(source, out / "ingest", labels_csv=labels_csv, progress=progress, exclude=None if inside_out else out)
    if not result.has_labels:
        raise ManifestError(f"{source}: no labels (a DICOM/NIfTI tree needs --labels)")
    if not result.rows:
        raise ManifestError(f"{source}: no usable labelled samples (see {out / 'ingest' / 'errors.csv'})")
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    samples = build_sample_set(result.rows, cfg.data, cache_dir, progress=progress)
    log.info("%d samples (%d from the cache at %s)", len(samples), samples.cache_hits, cache_dir)
    warnings = list(result.warnings)
    if not samples.has_patient_ids and NO_PATIENT_IDS not in warnings:
        warnings.insert(0, NO_PATIENT_IDS)
    return samples, warnings


def fold_data(samples: SampleSet, train_idx: np.ndarray, cfg: Config, seed: int) -> FoldData:
    inner_train, inner_val = inner_validation_split(samples.labels[train_idx], samples.patient_ids[train_idx],
                                                    cfg.train.val_fraction, seed)
    tr, va = train_idx[inner_train], train_idx[inner_val]
    n_val_patients = len(set(samples.patient_ids[va]))
    if 0 < n_val_patients < 6:
        log.warning("early stopping watches only %d validation patient(s): its choice of epoch is noise at this size; "
                    "consider train.val_fraction=0 (fixed schedule)", n_val_patients)
    y = torch.from_numpy(samples.labels)
    known = torch.from_numpy(samples.mask_known) if samples.mask_known is not None else None
    return FoldData(samples.images[tr], y[tr], samples.images[va], y[va], samples.masks[tr],
                    None if known is None else known[tr])


def run_fold(run: CVRun, fold: int, progress: bool) -> np.ndarray:
    """Train one fold (or load its finished result) and return its test probabilities ``(n, 3)``."""
    fold_dir = run.out / "folds" / f"fold_{fold}"
    done = fold_dir / "predictions.npy"
    test_idx = np.flatnonzero(run.folds == fold)
    if done.exists():
        proba = load_fold_file(done, lambda: np.load(done))
        if not isinstance(proba, np.ndarray) or proba.shape != (len(test_idx), len(CLASSES)):
            raise InputError(f"{done}: not this fold's predictions (shape {getattr(proba, 'shape', None)}, "
                             f"expected {(len(test_idx), len(CLASSES))}); delete it to retrain that fold ({fold_dir.name})")
        return proba
    seed = run.cfg.seed * 1000 + fold
    torch.manual_seed(seed)
    model = build_member(run.cfg)
    if run.cfg.model.pretrained_weights:
        from lung_effnet.models.factory import load_pretrained

        load_pretrained(model, run.cfg.model.pretrained_weights, 2 * run.cfg.data.context_slices + 1)
    train_idx = np.flatnonzero((run.folds != fold) & (run.folds != TEST_FOLD))
    trainer = FoldTrainer(model, fold_data(run.samples, train_idx, run.cfg, seed), run.cfg, fold_dir, seed)
    fold_run = run.tracker.fold(fold, {"n_train": len(train_idx), "n_test": len(test_idx)})
    result = trainer.fit(on_epoch=lambda epoch, rec: run.tracker.log_metrics(fold_run, rec, step=epoch), progress=progress)
    proba = predict_proba(trainer.model, run.samples.images[test_idx], amp=run.cfg.train.amp)
    metrics = classification_metrics(run.samples.labels[test_idx], proba)
    run.tracker.log_metrics(fold_run, {**{f"test_{k}": v for k, v in metrics.items()},
                                       "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"]})
    run.tracker.log_artifacts(fold_run, [fold_dir / "best.pt"], "model")
    run.tracker.finish(fold_run)
    np.save(done.with_suffix(".tmp.npy"), proba)
    os.replace(done.with_suffix(".tmp.npy"), done)  # written last: marks the fold finished
    return proba


def summarize(run: CVRun, oof: np.ndarray) -> dict:
    """Per-fold and pooled out-of-fold metrics, with patient-bootstrap 95% CIs on the pooled ones."""
    samples, folds = run.samples, run.folds
    cv_idx = np.flatnonzero(folds != TEST_FOLD)
    y, p, g = samples.labels[cv_idx], oof[cv_idx], samples.patient_ids[cv_idx]
    pooled: dict[str, float | list[float]] = {**classification_metrics(y, p)}
    cis = bootstrap_ci(y, p, np.where(np.char.startswith(g.astype(str), "row-"), "", g), n_boot=1000, seed=run.cfg.seed)
    pooled.update({f"{k}_ci95": list(v) for k, v in cis.items()})
    per_fold = []
    for fold in range(run.cfg.cv.folds):
        idx = np.flatnonzero(folds == fold)
        per_fold.append({"fold": fold, "n": int(len(idx)), **classification_metrics(samples.labels[idx], oof[idx])})
    return {"oof": pooled, "folds": per_fold,
            "n_samples": int(len(cv_idx)), "n_patients": int(len(set(g))),
            "patient_ids": "present" if samples.has_patient_ids else "missing (slice-level estimate)"}


def write_oof(run: CVRun, oof: np.ndarray) -> Path:
    rows = []
    for i, row in enumerate(run.samples.rows):
        if run.folds[i] == TEST_FOLD:
            continue
        rows.append({"path": row["path"], "patient_id": row.get("patient_id", ""), "fold": int(run.folds[i]),
                     "label": row["label"], **{f"p_{c}": f"{oof[i, j]:.6f}" for j, c in enumerate(CLASSES)},
                     "slice_index": row.get("slice_index", ""), "series_uid": row.get("series_uid", "")})
    return write_csv(run.out / "oof_predictions.csv", OOF_COLUMNS, rows)


def write_plots(run: CVRun, oof: np.ndarray) -> list[Path]:
    idx = np.flatnonzero(run.folds != TEST_FOLD)
    y, p = run.samples.labels[idx], oof[idx]
    plots = run.out / "plots"
    return [
        save_figure(plot_confusion_matrix(confusion(y, p.argmax(1)), "Out-of-fold confusion matrix"), plots / "confusion_matrix.png"),
        save_figure(plot_roc_curves(y, p), plots / "roc_curves.png"),
        save_figure(plot_reliability(y, p), plots / "reliability.png"),
    ]


def evaluate_test(run: CVRun, ensemble: Predictor) -> dict | None:
    """Metrics of the fold ensemble on the held-out test patients (when ``cv.test_fraction`` > 0)."""
    idx = np.flatnonzero(run.folds == TEST_FOLD)
    if len(idx) == 0:
        return None
    proba = ensemble.predict_proba(run.samples.images[idx].float())
    metrics = classification_metrics(run.samples.labels[idx], proba)
    cis = bootstrap_ci(run.samples.labels[idx], proba, run.samples.patient_ids[idx], seed=run.cfg.seed)
    return {**metrics, **{f"{k}_ci95": list(v) for k, v in cis.items()}}


def check_inputs(out: Path, cfg: Config, resume: bool) -> None:
    """Step 0: refuse what would fail later (an existing run without ``--resume``, missing weights)."""
    if (out / "folds").exists() and not resume:
        raise RunExistsError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    if cfg.model.pretrained_weights:  # a wrong name or a file that cannot be read stops here, not after preprocessing
        from lung_effnet.models.factory import check_weights

        check_weights(cfg.model.pretrained_weights)


def make_folds(out: Path, cfg: Config, samples: SampleSet) -> np.ndarray:
    """Step 2: patient-grouped, stratified folds (``TEST_FOLD`` for held-out test patients), audited for
    leakage and written to ``folds.csv``. Returns the fold of each sample, ``(N,)`` int."""
    folds = assign_folds(samples.labels, samples.patient_ids, cfg.cv.folds, cfg.seed, cfg.cv.test_fraction)
    audit_folds(folds, samples.patient_ids, samples.digests)
    write_folds_csv(out / "folds.csv", folds, samples.patient_ids, samples.labels)
    return folds


def train_folds(run: CVRun, progress: bool) -> np.ndarray:
    """Step 3: every fold model (checkpoints in ``folds/fold_k/``; a finished fold is not retrained).
    Returns the out-of-fold probabilities ``(N, 3)`` (NaN rows: test patients)."""
    oof = np.full((len(run.samples), len(CLASSES)), np.nan)
    for fold in range(run.cfg.cv.folds):
        oof[run.folds == fold] = run_fold(run, fold, progress)
    return oof


def save_ensemble(run: CVRun) -> tuple[Predictor, Path]:
    """Step 6: the fold models' best weights as one ensemble in ``model/``; returns it and the folder."""
    fold_states = [load_best_state(run.out / "folds" / f"fold_{k}" / "best.pt", "cpu") for k in range(run.cfg.cv.folds)]
    model_dir = save_model_dir(run.out / "model", run.cfg, fold_states)
    members = []
    for state in fold_states:
        member = build_member(run.cfg)
        member.load_state_dict(state)
        members.append(member)
    return Predictor(FoldEnsemble(members), run.cfg), model_dir


def publish(run: CVRun, summary: dict, model_dir: Path) -> dict:
    """Step 7: pooled metrics and the ensemble into the MLflow parent run (registered if configured).
    Returns the ``mlflow`` section of ``cv_summary.json``."""
    flat = {f"oof_{k}": v for k, v in summary["oof"].items() if not k.endswith("_ci95")}
    flat.update({f"oof_{k}_lo": v[0] for k, v in summary["oof"].items() if k.endswith("_ci95")})
    flat.update({f"oof_{k}_hi": v[1] for k, v in summary["oof"].items() if k.endswith("_ci95")})
    if "test" in summary:
        flat.update({f"test_{k}": v for k, v in summary["test"].items() if not k.endswith("_ci95")})
    run.tracker.log_metrics(run.parent_id, flat)
    model_uri = run.tracker.log_model(run.parent_id, model_dir, run.cfg.tracking.register_model, run.cfg.tracking.alias)
    return {"tracking_uri": run.tracker.uri, "experiment": run.cfg.tracking.experiment, "parent_run_id": run.parent_id,
            "model_uri": model_uri}


def write_summary(run: CVRun, summary: dict, plots: list[Path]) -> None:
    """Step 9: ``cv_summary.json``, logged with the out-of-fold predictions, folds and plots; closes the run."""
    (run.out / "cv_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    run.tracker.log_artifacts(run.parent_id, [run.out / "cv_summary.json", run.out / "oof_predictions.csv",
                                              run.out / "folds.csv"])
    run.tracker.log_artifacts(run.parent_id, plots, "plots")
    run.tracker.finish(run.parent_id)


def run_cv(source: str | Path, out_dir: str | Path, cfg: Config, labels_csv: str | Path | None = None,
           tracking_uri: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Run the whole ``train`` stage; returns the content of ``cv_summary.json``.

    Steps, each writing its product into ``out_dir``: check inputs; ingest and preprocess (``ingest/``,
    the cache); folds (``folds.csv``); one model per fold (``folds/fold_k/``); out-of-fold predictions
    (``oof_predictions.csv``); plots (``plots/``); the fold ensemble (``model/``); MLflow (metrics, model,
    registry); the saliency report (``saliency/``); ``cv_summary.json``.
    """
    out = Path(out_dir)
    check_inputs(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "mlflow_run.json"  # the run ids and the store, so --resume from anywhere continues them
    uri = run_tracking_uri(state_file, tracking_uri, cfg.tracking.tracking_uri)
    tracker = CVTracker(uri, cfg.tracking.experiment, state_file,  # fails fast if unreachable
                        timeout_s=cfg.tracking.timeout_s, retries=cfg.tracking.retries)
    samples, warnings = prepare_samples(Path(source), out, cfg, Path(labels_csv) if labels_csv else None, progress)
    for warning in warnings:
        log.warning(warning)
    folds = make_folds(out, cfg, samples)
    fingerprint = manifest_fingerprint(samples.rows)
    with tracker.ending_runs_on_error():  # a failure ends the parent and fold runs FAILED (KILLED on Ctrl-C)
        parent_id = tracker.parent(
            run_name=out.name, params=cfg.flat(),
            tags={"data_fingerprint": fingerprint, "code_version": code_version(), "n_samples": len(samples),
                  "patient_ids": "present" if samples.has_patient_ids else "missing",
                  "warnings": " | ".join(warnings) or "none"})
        run = CVRun(cfg, out, samples, folds, tracker, parent_id)

        oof = train_folds(run, progress)
        write_oof(run, oof)
        plots = write_plots(run, oof)
        ensemble, model_dir = save_ensemble(run)
        summary = summarize(run, oof)
        summary["warnings"] = warnings
        summary["data_fingerprint"] = fingerprint
        test = evaluate_test(run, ensemble)
        if test is not None:
            summary["test"] = test
        summary["mlflow"] = publish(run, summary, model_dir)
        from lung_effnet.explain.oof_report import report_after_training

        summary["saliency_report"] = report_after_training(out, cfg, tracker, parent_id)
        write_summary(run, summary, plots)
    return summary

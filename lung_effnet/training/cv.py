"""Patient-grouped cross-validation, end to end: the ``train`` stage.

source -> ingest (manifest) -> preprocessed tensors (cache) -> folds (+ leakage audit) -> one
model per fold (early stopping on inner validation patients) -> out-of-fold predictions ->
metrics with patient-bootstrap CIs -> model directory + MLflow (parent run, nested fold runs,
the fold ensemble as one logged model).

Every product is a file in ``out_dir``, and every fold's randomness derives from (seed, fold)
alone, so ``--resume`` after a crash skips finished folds, continues the interrupted one from its
last epoch, and ends with the same numbers as an uninterrupted run.

The same holds when the folds run as separate jobs (``run_cv(fold=i)``, then ``run_cv(merge=True)``;
``cluster`` submits them): the data, ``folds.csv`` and the MLflow parent run are made once, by the
first job to take the folder's lock (``open_run``), each finished fold records the identity it was
trained under (``fold.json``: config digest, data fingerprint, fold assignment), and the merge
refuses folds that are missing or were trained under another identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.config import Config
from lung_effnet.errors import InputError, ManifestError, RunExistsError
from lung_effnet.ingest.sources import NO_PATIENT_IDS, ingest
from lung_effnet.io.ledger import write_csv
from lung_effnet.io.shared_files import exclusive, try_lock, write_atomic
from lung_effnet.models.predictor import FoldEnsemble, Predictor, build_member, save_model_dir
from lung_effnet.models.training_data import write_training_data
from lung_effnet.preprocess.cache import SampleSet, build_sample_set, default_cache_dir
from lung_effnet.scoring.aggregate import TOP_K, aggregate_series
from lung_effnet.tracking import CVTracker, run_tracking_uri
from lung_effnet.training import distributed
from lung_effnet.training.fold import FoldData, FoldTrainer, load_best_state, load_fold_file, predict_proba, resolve_device
from lung_effnet.training.metrics import bootstrap_ci, classification_metrics, confusion
from lung_effnet.training.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, save_figure
from lung_effnet.training.splits import TEST_FOLD, assign_folds, audit_folds, inner_validation_split, write_folds_csv
from lung_effnet.version import __version__

log = logging.getLogger(__name__)

OOF_COLUMNS = ("path", "patient_id", "fold", "label", "p_benign", "p_malignant", "p_normal", "slice_index", "series_uid")


def code_version() -> str:
    """Package version, plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def config_digest(cfg: Config) -> str:
    """Digest of the settings that change a fold's result: all but where tracking goes and where the
    cache lives (two jobs may reach one store or cache by different paths)."""
    settings = cfg.to_dict()
    settings.pop("tracking", None)
    settings.get("data", {}).pop("cache_dir", None)
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


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
    identity: dict
    """What every fold of this run is trained under (``fold.json``): ``config``, ``data``, ``folds`` digests."""


def ingested_rows(source: Path, out: Path, labels_csv: Path | None, progress: bool) -> tuple[list[dict], list[str]]:
    """Step 1a: ``ingest`` the source into ``out/ingest``; returns its labelled rows and its warnings."""
    # the run's outputs are not inputs when --out lies inside the source; a source inside --out (pretrain
    # writes its phantoms to <out>/data) is read whole: the walk of it never reaches the outputs
    inside_out = Path(source).resolve().is_relative_to(Path(out).resolve())
    result = ingest(source, out / "ingest", labels_csv=labels_csv, progress=progress, exclude=None if inside_out else out)
    if not result.has_labels:
        raise ManifestError(f"{source}: no labels (a DICOM/NIfTI tree needs --labels)")
    if not result.rows:
        raise ManifestError(f"{source}: no usable labelled samples (see {out / 'ingest' / 'errors.csv'})")
    return result.rows, list(result.warnings)


def prepare_samples(source: Path, out: Path, cfg: Config, labels_csv: Path | None, progress: bool) -> tuple[SampleSet, list[str]]:
    """Step 1: ingest (``out/ingest``) and preprocess (through the cache). Under torchrun rank 0 does both
    while the other ranks wait; they then take its manifest rows and read the cache it filled, writing nothing."""
    rows, warnings = distributed.on_main(lambda: ingested_rows(source, out, labels_csv, progress))
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    samples = distributed.main_first(
        lambda: build_sample_set(rows, cfg.data, cache_dir, progress=progress and distributed.is_main()))
    log.info("%d samples (%d from the cache at %s)", len(samples), samples.cache_hits, cache_dir)
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


def finished_fold(run: CVRun, fold: int) -> np.ndarray | None:
    """A finished fold's test probabilities ``(n, 3)`` (its ``predictions.npy``); ``None`` if it is not finished."""
    fold_dir = run.out / "folds" / f"fold_{fold}"
    done = fold_dir / "predictions.npy"
    test_idx = np.flatnonzero(run.folds == fold)
    if not done.exists():
        return None
    check_fold_identity(run, [fold])
    proba = load_fold_file(done, lambda: np.load(done))
    if not isinstance(proba, np.ndarray) or proba.shape != (len(test_idx), len(CLASSES)):
        raise InputError(f"{done}: not this fold's predictions (shape {getattr(proba, 'shape', None)}, "
                         f"expected {(len(test_idx), len(CLASSES))}); delete it to retrain that fold ({fold_dir.name})")
    return proba


def run_fold(run: CVRun, fold: int, progress: bool) -> np.ndarray:
    """Train one fold (or load its finished result) and return its test probabilities ``(n, 3)``.

    Under torchrun every rank calls it: all train the fold together (``FoldTrainer``); rank 0 alone
    reads a finished fold, logs to MLflow, predicts and writes, and sends its predictions to the others."""
    fold_dir = run.out / "folds" / f"fold_{fold}"
    test_idx = np.flatnonzero(run.folds == fold)
    finished = distributed.on_main(lambda: finished_fold(run, fold))  # rank 0's answer: every rank takes one branch
    if finished is not None:
        return finished
    seed = run.cfg.seed * 1000 + fold
    torch.manual_seed(seed)
    model = initial_member(run.cfg)
    train_idx = np.flatnonzero((run.folds != fold) & (run.folds != TEST_FOLD))
    lock = distributed.on_main(lambda: claim_fold(run, fold))  # rank 0 holds it: no second process trains this fold
    try:
        trainer = FoldTrainer(model, fold_data(run.samples, train_idx, run.cfg, seed), run.cfg, fold_dir, seed)
        if not distributed.is_main():  # a torchrun rank > 0 trains with rank 0; rank 0 logs, predicts and writes
            trainer.fit(progress=False)
            return distributed.from_main()
        proba = train_and_record(run, fold, trainer, train_idx, test_idx, progress)
    finally:
        if distributed.is_main():
            os.close(lock)
    return distributed.from_main(proba)


def initial_member(cfg: Config) -> torch.nn.Module:
    """A fold model as training starts it: built from ``cfg``, its lesion finder (``model.lesion_finder``)
    and pretrained weights (``model.pretrained_weights``) loaded where the config names them."""
    from lung_effnet.models.factory import load_pretrained
    from lung_effnet.models.lesion_finder import load_finder

    model = build_member(cfg)
    if cfg.model.lesion_finder:
        load_finder(model, cfg.model.lesion_finder)
    if cfg.model.pretrained_weights:
        load_pretrained(model, cfg.model.pretrained_weights, 2 * cfg.data.context_slices + 1)
    return model


def train_and_record(run: CVRun, fold: int, trainer: FoldTrainer, train_idx: np.ndarray, test_idx: np.ndarray,
                     progress: bool) -> np.ndarray:
    """Rank 0's part of ``run_fold``: train with MLflow logging, predict the test patients, and mark
    the fold finished (``predictions.npy``, written last)."""
    fold_dir = run.out / "folds" / f"fold_{fold}"
    done = fold_dir / "predictions.npy"
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


FOLD_IDENTITY = "fold.json"


def claim_fold(run: CVRun, fold: int) -> int:
    """Before a fold trains: lock it (``InputError`` when another process is training it), refuse
    an interrupted fold (``last.pt``) that was started under other settings, and record this run's
    (``fold.json``) before any epoch, so a resume or a merge can tell. Returns the lock's descriptor."""
    fold_dir = run.out / "folds" / f"fold_{fold}"
    lock = try_lock(fold_dir / ".lock", f"fold {fold} of {run.out} is being trained by another process (a job "
                                        f"still running?): wait for it, or stop it first")
    try:
        if (fold_dir / FOLD_IDENTITY).exists() or (fold_dir / "last.pt").exists():
            check_fold_identity(run, [fold])
        write_atomic(fold_dir / FOLD_IDENTITY, json.dumps(run.identity, indent=2) + "\n")
    except BaseException:
        os.close(lock)
        raise
    return lock


def fold_identity_problem(run: CVRun, fold: int) -> str | None:
    """Why finished fold ``fold`` does not belong to ``run`` (trained under another config, data or
    fold assignment, or with no record of them), or ``None`` when it does."""
    path = run.out / "folds" / f"fold_{fold}" / FOLD_IDENTITY
    recorded = load_fold_file(path, lambda: json.loads(path.read_text())) if path.exists() else {}
    changed = sorted(k for k in run.identity if recorded.get(k) != run.identity[k])
    if not changed:
        return None
    return f"fold {fold}: " + ("no record of what it was trained under" if not recorded
                               else f"trained with another {', '.join(changed)}")


def check_fold_identity(run: CVRun, folds: list[int]) -> None:
    """Refuse, naming every one, finished folds that do not belong to ``run`` (``fold_identity_problem``)."""
    problems = [p for k in folds if (p := fold_identity_problem(run, k)) is not None]
    if problems:
        raise InputError(f"{run.out}: {'; '.join(problems)}: delete those folds/fold_K folders to train them again "
                         f"with these settings, or use another --out")


def missing_folds(out: Path, cfg: Config) -> list[int]:
    """Folds of the run in ``out`` without a finished result."""
    return [k for k in range(cfg.cv.folds) if not (out / "folds" / f"fold_{k}" / "predictions.npy").exists()]


def summarize(run: CVRun, oof: np.ndarray) -> dict:
    """Out-of-fold metrics with patient-bootstrap 95% CIs, at three levels, each count named by its unit:

    - ``oof``: per slice (``n_slices``), pooled over the folds; ``folds``: per slice, fold by fold;
    - ``oof_series`` / ``oof_patients``: per series (``n_series``) and per patient (``n_patients``),
      each the mean of its ``TOP_K`` most abnormal slices, the rule ``score`` applies to a series
      (``scoring.aggregate``), so the figures compare with what ``score`` reports. A series' or
      patient's label is its most severe slice label (malignant > benign > normal).
    """
    samples, folds = run.samples, run.folds
    cv_idx = np.flatnonzero(folds != TEST_FOLD)
    y, p, g = samples.labels[cv_idx], oof[cv_idx], samples.patient_ids[cv_idx]
    groups = np.where(np.char.startswith(g.astype(str), "row-"), "", g)  # no patient id: each row its own group
    series = np.array([r.get("series_uid") or r["path"] for r in (samples.rows[i] for i in cv_idx)])
    per_fold = []
    for fold in range(run.cfg.cv.folds):
        idx = np.flatnonzero(folds == fold)
        per_fold.append({"fold": fold, **with_counts(classification_metrics(samples.labels[idx], oof[idx]), "n_slices")})
    return {"oof": pooled_metrics(y, p, groups, run.cfg.seed, "n_slices"),
            "oof_series": pooled_metrics(*aggregated(y, p, series, groups), run.cfg.seed, "n_series"),
            "oof_patients": pooled_metrics(*aggregated(y, p, g, g), run.cfg.seed, "n_patients"),
            "aggregation": {"rule": "mean of the top_k most abnormal slices (as score)", "top_k": TOP_K},
            "folds": per_fold,
            "n_slices": int(len(cv_idx)), "n_series": int(len(set(series))), "n_patients": int(len(set(g))),
            "patient_ids": "present" if samples.has_patient_ids else "missing (slice-level estimate)"}


def with_counts(metrics: dict, unit: str) -> dict:
    """``classification_metrics`` with its row count ``n`` named by its unit (``n_slices``...)."""
    out = {k: v for k, v in metrics.items() if k != "n"}
    out[unit] = int(metrics["n"])
    return out


def pooled_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray, seed: int, unit: str) -> dict:
    """Metrics of ``(n,)`` labels and ``(n, 3)`` probabilities with 95% CIs resampling ``groups``
    (patients); the count is ``unit`` (a count has no CI)."""
    out: dict[str, float | int | list[float]] = with_counts(classification_metrics(y, p), unit)
    cis = bootstrap_ci(y, p, groups, n_boot=1000, seed=seed)
    out.update({f"{k}_ci95": list(v) for k, v in cis.items() if k != "n"})
    return out


SEVERITY = tuple(CLASSES.index(c) for c in ("malignant", "benign", "normal"))


def aggregated(y: np.ndarray, p: np.ndarray, keys: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct ``keys`` value (a series, a patient): its label (the most severe of its
    slices'), its probabilities (``aggregate_series``: top-k abnormality mean) and its bootstrap group."""
    order = {k: i for i, k in enumerate(dict.fromkeys(keys.tolist()))}
    rows = [np.flatnonzero(keys == k) for k in order]
    labels = np.array([min(y[r], key=SEVERITY.index) for r in rows])
    probs = np.stack([aggregate_series(p[r]).probs for r in rows])
    return labels, probs, np.array([groups[r[0]] for r in rows])


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
    if cfg.model.lesion_finder:
        from lung_effnet.models.lesion_finder import read_finder_state

        read_finder_state(cfg.model.lesion_finder)


def make_folds(out: Path, cfg: Config, samples: SampleSet) -> np.ndarray:
    """Step 2: patient-grouped, stratified folds (``TEST_FOLD`` for held-out test patients), audited for
    leakage and written to ``folds.csv`` once: a run that has one (an earlier job, a resumed run) must
    get the same assignment, or is refused. Returns the fold of each sample, ``(N,)`` int."""
    folds = assign_folds(samples.labels, samples.patient_ids, cfg.cv.folds, cfg.seed, cfg.cv.test_fraction)
    audit_folds(folds, samples.patient_ids, samples.digests)
    path, fresh = out / "folds.csv", out / ".folds.csv.new"
    write_folds_csv(fresh, folds, samples.patient_ids, samples.labels)
    if path.exists() and path.read_bytes() != fresh.read_bytes():
        fresh.unlink()
        raise InputError(f"{path} holds another fold assignment (other data, cv settings or seed): "
                         f"use another --out for this one")
    os.replace(fresh, path)
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
    write_training_data(model_dir, run.samples.rows)  # so that score can say when it is shown these series
    members = []
    for state in fold_states:
        member = build_member(run.cfg)
        member.load_state_dict(state)
        members.append(member)
    return Predictor(FoldEnsemble(members), run.cfg), model_dir


def publish(run: CVRun, summary: dict, model_dir: Path) -> dict:
    """Step 7: pooled metrics and the ensemble into the MLflow parent run (registered if configured).
    Returns the ``mlflow`` section of ``cv_summary.json``."""
    flat = {}
    for level in ("oof", "oof_series", "oof_patients"):
        flat.update({f"{level}_{k}": v for k, v in summary[level].items() if not k.endswith("_ci95")})
        flat.update({f"{level}_{k}_lo": v[0] for k, v in summary[level].items() if k.endswith("_ci95")})
        flat.update({f"{level}_{k}_hi": v[1] for k, v in summary[level].items() if k.endswith("_ci95")})
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


def tracker_for(out: Path, cfg: Config, tracking_uri: str | None) -> CVTracker:
    """The run's MLflow tracker: the store recorded in ``mlflow_run.json`` (or the one asked for)."""
    state_file = out / "mlflow_run.json"  # the run ids and the store, so --resume from anywhere continues them
    uri = run_tracking_uri(state_file, tracking_uri, cfg.tracking.tracking_uri)
    return CVTracker(uri, cfg.tracking.experiment, state_file,  # fails fast if unreachable
                     timeout_s=cfg.tracking.timeout_s, retries=cfg.tracking.retries)


def run_name(source: str | Path, out: Path, cfg: Config) -> str:
    """The parent run's name in the MLflow UI: what was trained on what, and where its files are,
    e.g. ``efficientnet-b0, 5-fold CV of data -> demo_output/train``."""
    return f"{cfg.model.name}, {cfg.cv.folds}-fold CV of {Path(source).name} -> {out.parent.name}/{out.name}"


def create_parent(source: str | Path, out: Path, cfg: Config, tracking_uri: str | None) -> str:
    """The MLflow parent run of the run in ``out``, made before any job starts (``cluster``): every
    fold job then attaches its run to it by id. Its data tags come with the first job (``open_run``)."""
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".train.lock", "preparing the data"):
        tracker = tracker_for(out, cfg, tracking_uri)
        return tracker.parent(run_name=run_name(source, out, cfg), params=cfg.flat(), tags={"code_version": code_version()},
                              hold=False)


def open_run(source: Path, out: Path, cfg: Config, labels_csv: Path | None, tracking_uri: str | None,
             progress: bool, hold_parent: bool = True) -> tuple[CVRun, list[str]]:
    """Steps 1-2 and the parent run, under the folder's lock: the first job of a run ingests and
    preprocesses (the cache), writes ``folds.csv`` and creates the MLflow parent run; a later job (or
    one that waited on the lock) reads the cache and gets the same folds and the same parent, by id.
    ``hold_parent``: this process runs the parent run (a fold job only attaches its fold run to it).
    Under torchrun, rank 0's work: it sends the folds and identity to the other ranks (``follow_run``)."""
    if not distributed.is_main():
        return follow_run(source, out, cfg, labels_csv)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".train.lock", "preparing the data"):
        tracker = tracker_for(out, cfg, tracking_uri)
        samples, warnings = prepare_samples(source, out, cfg, labels_csv, progress)
        for warning in warnings:
            log.warning(warning)
        folds = make_folds(out, cfg, samples)
        fingerprint = manifest_fingerprint(samples.rows)
        tags = {"data_fingerprint": fingerprint, "code_version": code_version(), "n_slices": len(samples),
                "patient_ids": "present" if samples.has_patient_ids else "missing", "warnings": " | ".join(warnings) or "none"}
        with tracker.ending_runs_on_error():
            parent_id = tracker.parent(run_name=run_name(source, out, cfg), params=cfg.flat(), tags=tags, hold=hold_parent)
            tracker.set_tags(parent_id, tags)  # a parent made before the data was read (``cluster``) gets them here
    identity = {"config": config_digest(cfg), "data": fingerprint,
                "folds": hashlib.blake2b((out / "folds.csv").read_bytes(), digest_size=16).hexdigest()}
    distributed.from_main((folds, identity))
    run = CVRun(cfg, out, samples, folds, tracker, parent_id, identity)
    # folds started or finished by other jobs of this folder must share these settings (fold.json): refused
    # now, naming them, not after hours of training a fold that the merge would refuse
    check_fold_identity(run, [k for k in range(cfg.cv.folds) if (out / "folds" / f"fold_{k}" / FOLD_IDENTITY).exists()])
    return run, warnings


def follow_run(source: Path, out: Path, cfg: Config, labels_csv: Path | None) -> tuple[CVRun, list[str]]:
    """``open_run`` on a torchrun rank other than 0: rank 0's manifest rows, read through the cache it
    filled, and its folds and identity. No lock, no file, no MLflow: the run's tracker is ``None`` here,
    and ``run_fold``, all such a rank does with the run, logs nothing on it."""
    samples, warnings = prepare_samples(source, out, cfg, labels_csv, progress=False)
    folds, identity = distributed.from_main()
    return CVRun(cfg, out, samples, folds, cast(CVTracker, None), "", identity), warnings


def run_cv(source: str | Path, out_dir: str | Path, cfg: Config, labels_csv: str | Path | None = None,
           tracking_uri: str | None = None, resume: bool = False, progress: bool = True,
           fold: int | None = None, merge: bool = False) -> dict:
    """Run the whole ``train`` stage, or one fold of it, or its merge; returns the content of
    ``cv_summary.json`` (one fold: ``{"fold": i, "n_test": n, "auroc_macro": ...}``).

    Steps, each writing its product into ``out_dir``: check inputs; ingest and preprocess (``ingest/``,
    the cache); folds (``folds.csv``); one model per fold (``folds/fold_k/``); out-of-fold predictions
    (``oof_predictions.csv``); plots (``plots/``); the fold ensemble (``model/``); MLflow (metrics, model,
    registry); the saliency report (``saliency/``); ``cv_summary.json``.

    ``fold``: train only that fold (a finished one is not retrained); several such jobs may run at
    once on one ``out_dir``. ``merge``: the steps after the folds, from finished folds only; refused,
    naming them, when folds are missing or were trained under another identity (``check_fold_identity``).
    Either implies ``resume``. The merged result equals a single run's (same config and seed).

    Under torchrun every process calls it and each fold trains data-parallel (``training.distributed``):
    rank 0 does and writes everything else; the other ranks write nothing and return ``{}``.
    """
    out = Path(out_dir)
    if distributed.launched_by_torchrun():  # data-parallel folds, one process per GPU (README, Train)
        distributed.init_from_env(resolve_device(cfg.train.device))
    if fold is not None and not 0 <= fold < cfg.cv.folds:
        raise InputError(f"--fold: must be 0..{cfg.cv.folds - 1} (cv.folds = {cfg.cv.folds}), got {fold}")
    if fold is not None and merge:
        raise InputError("--fold and --merge: one job does one of them")
    distributed.on_main(lambda: check_inputs(out, cfg, resume or fold is not None or merge))  # before any rank writes
    if merge and (missing := missing_folds(out, cfg)):
        raise InputError(f"--merge: fold(s) {', '.join(map(str, missing))} of {out} not finished: train them first "
                         f"(train ... --fold K), then merge")
    run, warnings = open_run(Path(source), out, cfg, Path(labels_csv) if labels_csv else None, tracking_uri, progress,
                             hold_parent=fold is None)
    if not distributed.is_main():  # a torchrun rank > 0 trains the folds with rank 0; the rest is rank 0's
        if fold is None:
            train_folds(run, progress=False)
        else:
            run_fold(run, fold, progress=False)
        return {}
    if fold is not None:
        with run.tracker.ending_runs_on_error():  # a failing fold ends its own run FAILED, not the parent
            proba = run_fold(run, fold, progress)
        idx = np.flatnonzero(run.folds == fold)
        return {"fold": fold, "n_test": int(len(idx)), **classification_metrics(run.samples.labels[idx], proba),
                "missing_folds": missing_folds(out, cfg)}
    if merge:
        check_fold_identity(run, list(range(cfg.cv.folds)))
    with run.tracker.ending_runs_on_error():  # a failure ends the parent and fold runs FAILED (KILLED on Ctrl-C)
        oof = train_folds(run, progress)
        write_oof(run, oof)
        plots = write_plots(run, oof)
        ensemble, model_dir = save_ensemble(run)
        summary = summarize(run, oof)
        summary["warnings"] = warnings
        summary["data_fingerprint"] = run.identity["data"]
        test = evaluate_test(run, ensemble)
        if test is not None:
            summary["test"] = test
        summary["mlflow"] = publish(run, summary, model_dir)
        from lung_effnet.explain.oof_report import report_after_training

        summary["saliency_report"] = report_after_training(out, cfg, run.tracker, run.parent_id, summary=summary)
        write_summary(run, summary, plots)
    if not cfg.train.keep_last_checkpoint:
        remove_last_checkpoints(out, cfg)
    return summary


def remove_last_checkpoints(out: Path, cfg: Config) -> None:
    """Step 10: each fold's ``last.pt`` (full training state, for continuing an interrupted fold) once
    the run has finished: ``best.pt`` and ``model/`` hold what the run produced."""
    for k in range(cfg.cv.folds):
        (out / "folds" / f"fold_{k}" / "last.pt").unlink(missing_ok=True)

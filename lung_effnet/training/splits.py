"""Patient-grouped, stratified cross-validation folds, and the audit that runs before training.

scikit-learn's ``StratifiedGroupKFold`` keeps all slices of a patient in one fold while keeping
the class mix of the folds close to the whole (MONAI has no grouped splitter). The audit then
refuses to train if a patient or an identical image sits in two folds.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lung_effnet.classes import CLASSES
from lung_effnet.errors import LeakageError, TooFewPatientsError
from lung_effnet.io.ledger import write_csv

log = logging.getLogger(__name__)

TEST_FOLD = -1
"""Fold number of patients held out of cross-validation for a final test."""


def _n_splits_for(fraction: float) -> int:
    return max(2, int(round(1.0 / fraction)))


def assign_folds(labels: np.ndarray, patient_ids: np.ndarray, k: int, seed: int, test_fraction: float = 0.0) -> np.ndarray:
    """Fold number per row: ``0..k-1``, or ``TEST_FOLD`` for held-out test patients.

    Args:
        labels: ``(N,)`` class indices; stratification uses each row's label.
        patient_ids: ``(N,)`` patient ids; all rows of one id get one fold.
        k: number of CV folds; seed: fixes the assignment.
        test_fraction: share of patients held out before CV (0 = none).

    Raises:
        TooFewPatientsError: fewer patients than folds, or a class with fewer patients than folds.
    """
    labels, patient_ids = np.asarray(labels), np.asarray(patient_ids)
    folds = np.full(len(labels), -2, dtype=np.int64)
    pool = np.arange(len(labels))
    if test_fraction > 0:
        splitter = StratifiedGroupKFold(n_splits=_n_splits_for(test_fraction), shuffle=True, random_state=seed)
        _, test_idx = next(splitter.split(pool, labels, patient_ids))
        folds[test_idx] = TEST_FOLD
        pool = np.setdiff1d(pool, test_idx)
    n_patients = len(set(patient_ids[pool]))
    if n_patients < k:
        raise TooFewPatientsError(f"cv.folds={k} needs at least {k} patients; the data has {n_patients}")
    for cls in np.unique(labels[pool]):
        n_cls = len(set(patient_ids[pool][labels[pool] == cls]))
        if n_cls < k:
            raise TooFewPatientsError(f"class {CLASSES[cls]} has {n_cls} patient(s), fewer than cv.folds={k}: "
                             f"some folds would have none; lower cv.folds or add data")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test_idx) in enumerate(splitter.split(pool, labels[pool], patient_ids[pool])):
        folds[pool[test_idx]] = fold
    return folds


def inner_validation_split(labels: np.ndarray, patient_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training rows into (train, validation) index arrays by patient, stratified.

    The validation patients drive early stopping and the scheduler; the fold's test patients are
    never seen before the fold's final evaluation.
    """
    idx = np.arange(len(labels))
    if fraction <= 0 or len(set(patient_ids)) < 4:
        return idx, idx[:0]
    n_splits = _n_splits_for(fraction)
    if np.all(np.unique(labels, return_counts=True)[1] < n_splits):  # scikit-learn refuses to split these
        log.warning("train.val_fraction=%g splits a fold's training rows %d ways, and no class has %d rows: trained "
                    "without validation patients (fixed schedule, the last epoch kept)", fraction, n_splits, n_splits)
        return idx, idx[:0]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(idx, labels, patient_ids))
    return train_idx, val_idx


def audit_folds(folds: np.ndarray, patient_ids: np.ndarray, digests: np.ndarray) -> None:
    """Stop (``LeakageError``) if a patient or identical pixel content is in two folds."""
    for name, keys in (("patient", patient_ids), ("identical image", digests)):
        seen = defaultdict(set)
        for key, fold in zip(keys, folds):
            seen[key].add(int(fold))
        leaks = [key for key, fs in seen.items() if len(fs) > 1]
        if leaks:
            raise LeakageError(f"{len(leaks)} {name}(s) in more than one fold (e.g. {leaks[0]}): "
                               "the CV estimate would be optimistic; fix the manifest (duplicates, patient ids)")


def write_folds_csv(path: str | Path, folds: np.ndarray, patient_ids: np.ndarray, labels: np.ndarray) -> Path:
    """``folds.csv``: one row per patient: ``patient_id,fold,label,n_slices`` (fold -1: test)."""
    per_patient: dict[str, dict] = {}
    for g, f, y in zip(patient_ids, folds, labels):
        entry = per_patient.setdefault(str(g), {"patient_id": str(g), "fold": int(f), "label": CLASSES[int(y)], "n_slices": 0})
        entry["n_slices"] += 1
    rows = sorted(per_patient.values(), key=lambda r: (r["fold"], r["patient_id"]))
    return write_csv(path, ("patient_id", "fold", "label", "n_slices"), rows)

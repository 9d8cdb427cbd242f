"""Metrics, patient-level bootstrap CIs and calibration for the 3-class classifier.

Inputs everywhere: ``y_true`` int array ``(N,)`` of class indices into ``CLASSES``
(0 benign, 1 malignant, 2 normal) and ``proba`` float array ``(N, 3)`` of class probabilities
(rows sum to 1, columns in ``CLASSES`` order). The predicted class is ``argmax(proba)``
(ties go to the lower index).

What is computed, and how:

- **Point metrics** (``classification_metrics``) come from scikit-learn: ``accuracy_score``,
  ``balanced_accuracy_score`` (mean recall over the classes present in ``y_true``), ``f1_score``
  (macro over the three labels; a class absent from both ``y_true`` and the predictions has no F1
  and is left out of the mean), one-vs-rest ``roc_auc_score`` per class (``auroc_macro`` is the mean
  of the defined ones), pairwise AUROCs (below), and ``confusion_matrix`` from which per-class one-vs-rest sensitivity
  ``TP / (TP + FN)`` and specificity ``TN / (TN + FP)`` are read. An undefined metric (a class
  missing from ``y_true`` for its AUROC or sensitivity, no negatives for a specificity) is ``nan``;
  nothing raises and nothing warns.
- **Pairwise AUROC** ``auroc_<a>_vs_<b>`` (Hand & Till, Machine Learning 45:171-186, 2001): on the rows
  of classes a and b only, the mean of the AUROC of ``proba[:, a]`` for "a, not b" and of ``proba[:, b]``
  for "b, not a"; with all three classes present, the mean of the three is scikit-learn's
  ``roc_auc_score(multi_class="ovo")``; nan for a pair with a class absent. Why: a
  class's one-vs-rest AUROC mixes its two confusions. A benign AUROC of 0.74 can mean "benign told from
  malignant, not at all from normal" (benchmarks/RESULTS.md measured exactly that); the pairs show it.
- **Calibration**: the top-class confidence ``max(proba)`` is put in ``n_bins`` equal-width bins on
  [0, 1], right-closed (``(lo, hi]``, the first bin ``[0, hi]``; the binning of scikit-learn's
  ``calibration_curve(strategy="uniform")``). ECE = sum over bins of ``n_b / N * |acc_b - conf_b|``
  where ``acc_b`` is the fraction of rows whose top class is right and ``conf_b`` the mean
  confidence (Guo et al., 2017). scikit-learn has no ECE, so this one is written out.
- **Bootstrap CIs** (``bootstrap_ci``) resample patients, not rows: each resample draws as many
  patients as there are, with replacement, and every row of a drawn patient enters once per draw.
  A resample is therefore a vector of non-negative integer row weights, and every metric of the
  resample equals the metric on the data with each row repeated that many times. Calling
  scikit-learn 1000 times per metric costs ~17 ms a resample (validation overhead), so
  resamples are evaluated together, as a ``(B, N)`` weight matrix, by ``metrics_for_weights``:
  weighted confusion matrices and calibration bins are one matrix product each, AUROC is the
  weighted Mann-Whitney statistic (ties count 1/2) over score ranks sorted once. That is the same
  number as scikit-learn's trapezoidal ROC AUC, and the tests check every metric of it against
  ``classification_metrics`` on row-repeated data. CIs are percentile intervals over the finite
  resamples (a resample where, e.g., no malignant patient was drawn has no malignant AUROC and is
  left out for that metric only); a metric with no finite resample gets ``(nan, nan)``.

Plots of these metrics are in ``plots``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from lung_effnet.classes import CLASSES

N_CLASSES = len(CLASSES)
_LABELS = list(range(N_CLASSES))
_SUM_TOL = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; anything further off is not a probability
_CHUNK_ELEMENTS = 4_000_000  # (resamples x rows) per weight block: 32 MB of float64
_DRAW_CHUNK = 64  # resamples drawn at a time; fixed, so draws do not depend on N

PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))
"""Class index pairs of the pairwise AUROCs: benign-malignant, benign-normal, malignant-normal."""

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    *(f"auroc_{c}" for c in CLASSES),
    "auroc_macro",
    *(f"auroc_{CLASSES[a]}_vs_{CLASSES[b]}" for a, b in PAIRS),
    *(f"sensitivity_{c}" for c in CLASSES),
    *(f"specificity_{c}" for c in CLASSES),
    "ece",
    "n",
)
"""The keys of ``classification_metrics``, in order."""


# ---------------------------------------------------------------- input checks


def _check_labels(y: object, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class indices 0..{N_CLASSES - 1}, got non-integers")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices 0..{N_CLASSES - 1}, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= N_CLASSES):
        raise ValueError(
            f"{name} must hold class indices 0..{N_CLASSES - 1} ({', '.join(CLASSES)}), "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


def check_inputs(y_true: object, proba: object) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y (N,) int64, p (N, 3) float64)``; messages say what was expected and what came."""
    y = _check_labels(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != N_CLASSES:
        raise ValueError(f"proba must have shape (N, {N_CLASSES}) (columns {CLASSES}), got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} rows but proba has {p.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("y_true and proba are empty: need at least one row")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    if p.min() < -_SUM_TOL or p.max() > 1 + _SUM_TOL:
        raise ValueError(f"proba must lie in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]")
    worst = float(np.max(np.abs(p.sum(axis=1) - 1.0)))
    if worst > _SUM_TOL:
        raise ValueError(f"proba rows must sum to 1 (softmax output); the worst row is off by {worst:.3g}")
    return y, p


# ---------------------------------------------------------------- confusion-matrix rates


def nan_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nan_mean_last(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where all are NaN (no RuntimeWarning)."""
    finite = np.isfinite(x)
    return nan_div(np.where(finite, x, 0.0).sum(axis=-1), finite.sum(axis=-1))


def _one_vs_rest_counts(cm: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(TP, FN, FP, TN)`` per class, each ``(..., 3)``, from confusion matrices ``(..., 3, 3)``
    (rows true class, columns predicted)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    fn = cm.sum(axis=-1) - tp
    fp = cm.sum(axis=-2) - tp
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fn - fp
    return tp, fn, fp, tn


def _sensitivity_specificity(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp, fn, fp, tn = _one_vs_rest_counts(cm)
    return nan_div(tp, tp + fn), nan_div(tn, tn + fp)


# ---------------------------------------------------------------- calibration


def _calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per row: bin index ``(N,)`` of the top-class confidence, that confidence, and 1.0 if right."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence)  # as sklearn's calibration_curve
    return bins, confidence, correct


def reliability_curve(y_true: object, proba: object, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability of the top-class confidence in ``n_bins`` equal-width bins on [0, 1].

    Args:
        y_true: ``(N,)`` int class indices. proba: ``(N, 3)`` probabilities.
    Returns:
        ``bin_edges`` ``(n_bins + 1,)``, ``bin_centres`` ``(n_bins,)``, ``accuracy`` ``(n_bins,)``
        (fraction of rows in the bin whose top class is right), ``confidence`` ``(n_bins,)`` (mean
        top-class probability in the bin), both NaN for empty bins, and ``counts`` ``(n_bins,)`` int.
    """
    y, p = check_inputs(y_true, proba)
    bins, confidence, correct = _calibration_bins(y, p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_edges": edges,
        "bin_centres": (edges[:-1] + edges[1:]) / 2,
        "accuracy": nan_div(np.bincount(bins, weights=correct, minlength=n_bins), counts),
        "confidence": nan_div(np.bincount(bins, weights=confidence, minlength=n_bins), counts),
        "counts": counts,
    }


def expected_calibration_error(y_true: object, proba: object, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: ``sum_b n_b / N * |acc_b - conf_b|`` over ``n_bins``
    equal-width bins (see the module docstring). A fraction in [0, 1]; 0 is perfectly calibrated."""
    y, p = check_inputs(y_true, proba)
    bins, confidence, correct = _calibration_bins(y, p, n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / y.shape[0])


# ---------------------------------------------------------------- point metrics


def confusion(y_true: object, y_pred: object) -> np.ndarray:
    """Confusion matrix ``(3, 3)`` int: rows true class, columns predicted, in ``CLASSES`` order;
    a class absent from both inputs still has its (zero) row and column."""
    y = _check_labels(y_true)
    yp = _check_labels(y_pred, "y_pred")
    if y.shape != yp.shape:
        raise ValueError(f"y_true has {y.shape[0]} rows but y_pred has {yp.shape[0]}")
    return confusion_matrix(y, yp, labels=_LABELS)


def auroc_one_vs_rest(y: np.ndarray, p: np.ndarray, k: int) -> float:
    positive = y == k
    if positive.all() or not positive.any():
        return float("nan")  # one class only: undefined, and sklearn would raise
    return float(roc_auc_score(positive, p[:, k]))


def auroc_pair(y: np.ndarray, p: np.ndarray, a: int, b: int) -> float:
    """Hand & Till's pairwise AUROC of classes ``a`` and ``b`` (module docstring); nan unless both occur."""
    pair = (y == a) | (y == b)
    if not (y == a).any() or not (y == b).any():
        return float("nan")
    return float((roc_auc_score(y[pair] == a, p[pair, a]) + roc_auc_score(y[pair] == b, p[pair, b])) / 2)


def classification_metrics(y_true: object, proba: object) -> dict[str, float]:
    """All metrics of a 3-class prediction, computed with scikit-learn (see the module docstring).

    Args:
        y_true: ``(N,)`` int class indices into ``CLASSES``.
        proba: ``(N, 3)`` float probabilities, rows summing to 1, columns in ``CLASSES`` order.
    Returns:
        ``{name: float}`` with the keys of ``METRIC_NAMES``: fractions in [0, 1] (``n`` is the row
        count); ``nan`` where a metric is undefined for these labels.
    """
    y, p = check_inputs(y_true, proba)
    y_pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # Undefined cases become NaN below or are left out of sklearn's macro means; keep the terminal quiet.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")  # one class in both: defined, not news
        out = {
            "accuracy": float(accuracy_score(y, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, y_pred)),
            "macro_f1": float(f1_score(y, y_pred, labels=_LABELS, average="macro", zero_division=np.nan)),
        }
        aurocs = [auroc_one_vs_rest(y, p, k) for k in range(N_CLASSES)]
    out.update({f"auroc_{c}": a for c, a in zip(CLASSES, aurocs)})
    out["auroc_macro"] = float(_nan_mean_last(np.asarray(aurocs)))
    out.update({f"auroc_{CLASSES[a]}_vs_{CLASSES[b]}": auroc_pair(y, p, a, b) for a, b in PAIRS})
    sensitivity, specificity = _sensitivity_specificity(confusion(y, y_pred))
    out.update({f"sensitivity_{c}": float(s) for c, s in zip(CLASSES, sensitivity)})
    out.update({f"specificity_{c}": float(s) for c, s in zip(CLASSES, specificity)})
    out["ece"] = expected_calibration_error(y, p)
    out["n"] = float(y.shape[0])
    return out


# ---------------------------------------------------------------- many weighted resamples at once


class _WeightedMetrics:
    """Everything about the rows that does not depend on the weights, computed once."""

    def __init__(self, y: np.ndarray, p: np.ndarray, n_bins: int = 15):
        n = y.shape[0]
        y_pred = p.argmax(axis=1)
        self.cell = np.zeros((n, N_CLASSES * N_CLASSES))  # one-hot of the confusion-matrix cell
        self.cell[np.arange(n), y * N_CLASSES + y_pred] = 1.0
        bins, confidence, correct = _calibration_bins(y, p, n_bins)
        self.calibration_gap = np.zeros((n, n_bins))  # (right - confidence) in the row's bin
        self.calibration_gap[np.arange(n), bins] = correct - confidence
        self.ranks = []  # per class: score order, tie-block starts, positives in score order
        for k in range(N_CLASSES):
            order = np.argsort(p[:, k], kind="stable")
            s = p[order, k]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            self.ranks.append((order, starts, (y[order] == k).astype(np.float64)))
        self.in_pair = [((y == a) | (y == b)).astype(np.float64) for a, b in PAIRS]  # (N,) row masks

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """Metrics ``(B, len(METRIC_NAMES))`` for row weights ``w`` ``(B, N)``."""
        cm = (w @ self.cell).reshape(-1, N_CLASSES, N_CLASSES)
        total = cm.sum(axis=(1, 2))
        tp, fn, fp, _ = _one_vs_rest_counts(cm)
        sensitivity, specificity = _sensitivity_specificity(cm)
        aurocs = np.stack([self._auroc(w, *r) for r in self.ranks], axis=1)
        # a vs b: only a's and b's rows count, so every other row's weight is zeroed
        pairs = [(self._auroc(w * mask, *self.ranks[a]) + self._auroc(w * mask, *self.ranks[b])) / 2
                 for (a, b), mask in zip(PAIRS, self.in_pair)]
        cols = [
            nan_div(tp.sum(axis=1), total),
            _nan_mean_last(sensitivity),  # sklearn: mean recall over classes present in y_true
            _nan_mean_last(nan_div(2 * tp, 2 * tp + fp + fn)),
            *aurocs.T,
            _nan_mean_last(aurocs),
            *pairs,
            *sensitivity.T,
            *specificity.T,
            nan_div(np.abs(w @ self.calibration_gap).sum(axis=1), total),
            total,
        ]
        return np.stack(cols, axis=1)

    @staticmethod
    def _auroc(w: np.ndarray, order: np.ndarray, starts: np.ndarray, positive: np.ndarray) -> np.ndarray:
        # Weighted Mann-Whitney: P(score_pos > score_neg) + 1/2 P(tie), over blocks of tied scores.
        ws = w[:, order]
        pos = np.add.reduceat(ws * positive, starts, axis=1)
        neg = np.add.reduceat(ws, starts, axis=1) - pos
        neg_below = np.cumsum(neg, axis=1) - neg
        num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        return nan_div(num, pos.sum(axis=1) * neg.sum(axis=1))


def metrics_for_weights(y_true: object, proba: object, weights: ArrayLike) -> dict[str, np.ndarray]:
    """The metrics of ``classification_metrics`` for many row weightings at once.

    Args:
        y_true: ``(N,)`` int class indices. proba: ``(N, 3)`` probabilities.
        weights: ``(B, N)`` (or ``(N,)``) non-negative row weights; integer weights ``w[b]`` mean
            "row i repeated ``w[b, i]`` times" (a bootstrap resample).
    Returns:
        ``{name: (B,) float array}`` for every name in ``METRIC_NAMES``. Row ``b`` equals
        ``classification_metrics`` on the rows repeated ``w[b]`` times (to float rounding).
    """
    y, p = check_inputs(y_true, proba)
    w = np.asarray(weights, dtype=np.float64)
    w = w[None, :] if w.ndim == 1 else w
    if w.ndim != 2 or w.shape[1] != y.shape[0]:
        raise ValueError(f"weights must have shape (B, {y.shape[0]}), got {np.shape(weights)}")
    if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
        raise ValueError("weights must be finite and non-negative")
    engine = _WeightedMetrics(y, p)
    step = max(1, _CHUNK_ELEMENTS // y.shape[0])
    blocks = [engine(w[i : i + step]) for i in range(0, w.shape[0], step)]
    values = np.concatenate(blocks) if blocks else np.empty((0, len(METRIC_NAMES)))
    return {name: values[:, j] for j, name in enumerate(METRIC_NAMES)}


# ---------------------------------------------------------------- bootstrap by patient


def _is_unknown(g: object) -> bool:
    return g is None or (isinstance(g, float) and math.isnan(g)) or str(g).strip() == ""


def _group_index(patient_ids: object, n: int) -> tuple[np.ndarray, int]:
    """Per row, the index ``(N,)`` of its group, and the group count. Unknown ids (empty string,
    None, NaN) are each their own group."""
    if patient_ids is None:
        return np.arange(n), n
    g = np.asarray(patient_ids, dtype=object)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"patient_ids must be a 1-D array of {n} patient ids (one per row), got shape {g.shape}")
    unknown = np.fromiter((_is_unknown(x) for x in g), dtype=bool, count=n)
    index = np.empty(n, dtype=np.int64)
    known_ids, index[~unknown] = np.unique(g[~unknown].astype(str), return_inverse=True)
    n_known = known_ids.shape[0]
    index[unknown] = n_known + np.arange(int(unknown.sum()))
    return index, n_known + int(unknown.sum())


def bootstrap_ci(
    y_true: object,
    proba: object,
    patient_ids: object,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile ``1 - alpha`` CIs for every metric of ``classification_metrics``, resampling patients.

    Args:
        y_true: ``(N,)`` int class indices. proba: ``(N, 3)`` probabilities.
        patient_ids: ``(N,)`` patient ids (strings); an empty id means "unknown patient" and makes that
            row its own group. ``None``: every row is its own group (a row bootstrap).
        n_boot: number of resamples. seed: seed of ``numpy.random.default_rng``. alpha: 0.05 -> 95% CI.
    Returns:
        ``{name: (low, high)}`` for every name in ``METRIC_NAMES``; NaN resamples are left out of the
        percentiles and a metric with no finite resample gets ``(nan, nan)``.
    """
    y, p = check_inputs(y_true, proba)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    index, n_groups = _group_index(patient_ids, y.shape[0])
    engine = _WeightedMetrics(y, p)
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_ELEMENTS // y.shape[0])
    values: list[np.ndarray] = []
    for start in range(0, int(n_boot), _DRAW_CHUNK):
        b = min(_DRAW_CHUNK, int(n_boot) - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        offsets = (np.arange(b) * n_groups)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=b * n_groups).reshape(b, n_groups)
        weights = counts[:, index].astype(np.float64)  # a drawn patient's rows, once per draw
        values.extend(engine(weights[i : i + step]) for i in range(0, b, step))
    samples = np.concatenate(values)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out: dict[str, tuple[float, float]] = {}
    for j, name in enumerate(METRIC_NAMES):
        finite = samples[np.isfinite(samples[:, j]), j]
        if finite.size:
            low, high = np.percentile(finite, q)
            out[name] = (float(low), float(high))
        else:
            out[name] = (math.nan, math.nan)
    return out


# ---------------------------------------------------------------- across folds


def summarize_folds(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1) of each metric across folds.

    Args:
        per_fold: one ``classification_metrics``-like dict per fold.
    Returns:
        flat ``{f"{name}_mean": float, f"{name}_std": float}`` (ready for MLflow ``log_metrics``)
        for every name seen in any fold, in first-seen order. NaN folds are left out; with no
        finite fold both are NaN, with one the std is NaN.
    """
    names: list[str] = []
    for fold in per_fold:
        names.extend(k for k in fold if k not in names)
    out: dict[str, float] = {}
    for name in names:
        v = np.array([float(f.get(name, math.nan)) for f in per_fold], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[f"{name}_mean"] = float(v.mean()) if v.size else math.nan
        out[f"{name}_std"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return out

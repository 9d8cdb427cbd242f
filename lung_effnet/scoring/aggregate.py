"""From slice probabilities to one result per series: the aggregation rule.

Rule (top-k abnormality mean): a slice's *abnormality* is ``p_benign + p_malignant`` (= 1 -
``p_normal``). The series' probabilities are the mean probability vectors of its ``k`` most
abnormal slices, ``k = min(TOP_K, n_slices)``; ties are broken by the lower slice index. The
predicted class is the arg-max of that mean, and the *key slice* is the most abnormal slice.

Why: in a chest CT most slices are normal even when a nodule is present (a 10 mm nodule spans a
few slices of hundreds), so the mean over all slices would drown it, while the single maximum
lets one noisy slice decide. A mean over the few most suspicious slices follows the lesion and
smooths slice noise; for a normal series those slices still look normal. The series
probabilities are therefore those of its most suspicious region, not calibrated series-level
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lung_effnet.classes import CLASSES

TOP_K = 5
"""Slices averaged per series (see module docstring)."""


@dataclass
class SeriesScore:
    """``probs``: ``(3,)`` in ``CLASSES`` order; ``top``: indices of the averaged slices, most
    abnormal first; ``key_slice`` = ``top[0]``."""

    probs: np.ndarray
    predicted: str
    key_slice: int
    top: np.ndarray


def abnormality(probs: np.ndarray) -> np.ndarray:
    """``(N,)`` = 1 - p_normal for slice probabilities ``(N, 3)``."""
    return 1.0 - probs[:, CLASSES.index("normal")]


def aggregate_series(probs: np.ndarray, top_k: int = TOP_K) -> SeriesScore:
    """Apply the rule to ``(N, 3)`` slice probabilities (N >= 1) of one series."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES) or len(probs) == 0:
        raise ValueError(f"expected (N >= 1, {len(CLASSES)}) slice probabilities, got shape {probs.shape}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not np.isfinite(probs).all():  # NaN would leave the ranking silently and argmax(NaN) is "benign"
        raise ValueError(f"slice probabilities hold NaN or inf (slices {np.flatnonzero(~np.isfinite(probs).all(1)).tolist()[:10]})")
    order = np.lexsort((np.arange(len(probs)), -abnormality(probs)))  # most abnormal first, then index
    top = order[:min(top_k, len(probs))]
    series = probs[top].mean(axis=0)
    return SeriesScore(series, CLASSES[int(np.argmax(series))], int(top[0]), top)

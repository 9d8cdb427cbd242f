"""Plots of the out-of-fold metrics: confusion matrix, one-vs-rest ROC curves, reliability diagram.

Inputs as in ``metrics``: ``y_true`` ``(N,)`` class indices, ``proba`` ``(N, 3)`` in ``CLASSES`` order.
Plots are built on ``matplotlib.figure.Figure`` directly (no pyplot state, nothing shown, PNG
through Agg), so they neither open windows nor pile up in pyplot's figure manager.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from lung_effnet.classes import CLASSES
from lung_effnet.training.metrics import (
    N_CLASSES,
    auroc_one_vs_rest,
    check_inputs,
    expected_calibration_error,
    nan_div,
    reliability_curve,
)


def plot_confusion_matrix(cm: object, title: str = "") -> Figure:
    """Heat map of a ``(3, 3)`` confusion matrix (rows true, columns predicted): colour and the
    second line of each cell are the row-normalised %, the first line the count."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.shape != (N_CLASSES, N_CLASSES):
        raise ValueError(f"cm must have shape ({N_CLASSES}, {N_CLASSES}), got {cm.shape}")
    pct = 100 * nan_div(cm, cm.sum(axis=1, keepdims=True))
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(pct), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of true class")
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            count = f"{cm[i, j]:.0f}" if cm[i, j] == round(cm[i, j]) else f"{cm[i, j]:.1f}"
            share = "-" if np.isnan(pct[i, j]) else f"{pct[i, j]:.1f}%"
            colour = "white" if np.nan_to_num(pct[i, j]) > 50 else "black"
            ax.text(j, i, f"{count}\n{share}", ha="center", va="center", color=colour, fontsize=10)
    ax.set_xticks(range(N_CLASSES), CLASSES)
    ax.set_yticks(range(N_CLASSES), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n = {cm.sum():.0f})")
    fig.tight_layout()
    return fig


def plot_roc_curves(y_true: object, proba: object, title: str = "") -> Figure:
    """One-vs-rest ROC curve per class with its AUROC in the legend, and the chance diagonal.
    A class with one label only (no positives or no negatives) is listed as ``n/a``."""
    y, p = check_inputs(y_true, proba)
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    for k, name in enumerate(CLASSES):
        auroc = auroc_one_vs_rest(y, p, k)
        if math.isnan(auroc):
            ax.plot([], [], label=f"{name} (AUROC n/a: one label only)")
            continue
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
    ax.set_aspect("equal")
    ax.set_title(title or f"ROC, one-vs-rest (n = {y.shape[0]})")
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


def plot_reliability(y_true: object, proba: object, n_bins: int = 15) -> Figure:
    """Reliability diagram of the top-class confidence (accuracy per bin against the diagonal,
    mean confidence marked) with the ECE in the title, and the row count per bin below."""
    curve = reliability_curve(y_true, proba, n_bins)
    ece = expected_calibration_error(y_true, proba, n_bins)
    centres, width = curve["bin_centres"], 1.0 / n_bins
    fig = Figure(figsize=(5.2, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = curve["counts"] > 0
    top.bar(centres[filled], curve["accuracy"][filled], width=width, edgecolor="black", alpha=0.8, label="accuracy")
    top.plot(centres[filled], curve["confidence"][filled], "o", color="tab:red", ms=4, label="mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy of top class")
    top.set_title(f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centres, curve["counts"], width=width, edgecolor="black", color="tab:grey")
    bottom.set(xlabel="top-class confidence", ylabel="rows")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at 120 dpi (creating the folder) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a figure made through pyplot is held by its manager until closed
        pyplot.close(fig)
    return path

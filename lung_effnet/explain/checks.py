"""Faithfulness checks of saliency maps: do they depend on what the model learned, and do they
land on the lesion?

- Model-parameter randomization test (Adebayo et al., NeurIPS 2018): Spearman rank correlation
  between each image's map from the trained model and from a copy with re-initialised weights.
  A map that survives randomization (high correlation) shows the image, not the model. Grad-CAM
  is expected to pass (low correlation); the check passes when the median is below
  ``RANDOMIZATION_MAX_RHO``.
- Pointing game (Zhang et al., ECCV 2016): a hit when the map's maximum lies inside the lesion
  mask or within ``margin`` pixels of it (Zhang et al.: 15 px at 224 px; here 15/224 of the side).
- Energy in lesion: the share of the map's sum that falls inside the mask.

Each localization figure comes with its chance level, what a map with no information scores:
the share of pixels within the margin of the lesion (pointing game of a uniformly random point)
and the lesion's area share (energy of a uniform map). Small lesions make both small, which is
why they are reported side by side rather than against a fixed threshold.

Maps and masks are ``(H, W)`` arrays (maps in [0, 1], masks > 0 inside the lesion); pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

from lung_effnet.classes import CLASSES

RANDOMIZATION_MAX_RHO = 0.5
"""Median Spearman rho (trained vs randomized maps) below which the randomization check passes."""
POINTING_MARGIN = 15 / 224
"""Pointing-game tolerance as a fraction of the image side (Zhang et al.: 15 px at 224 px)."""


def margin_px(shape: Sequence[int], margin: float = POINTING_MARGIN) -> float:
    """The pointing-game tolerance in pixels for an image of ``shape`` ``(H, W)``."""
    return margin * max(shape[-2:])


def peak_location(cam: np.ndarray) -> tuple[float, float]:
    """``(y, x)`` of the map's maximum; where several pixels tie (a map upsampled from a coarse
    grid has flat plateaus at its borders), the centroid of the tied pixels."""
    cam = np.asarray(cam, dtype=np.float64)
    top = cam >= cam.max() - 1e-6 * max(abs(float(cam.max())), 1e-12)
    ys, xs = np.nonzero(top)
    return float(ys.mean()), float(xs.mean())


def distance_to_lesion(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` Euclidean distance (pixels) from each pixel to the nearest lesion pixel (0 inside)."""
    return ndimage.distance_transform_edt(~(np.asarray(mask) > 0))


def pointing_hit(cam: np.ndarray, mask: np.ndarray, margin: float = POINTING_MARGIN) -> bool:
    """Whether the map's maximum is inside the lesion or within the margin of it."""
    y, x = peak_location(cam)
    return bool(distance_to_lesion(mask)[int(round(y)), int(round(x))] <= margin_px(np.shape(mask), margin))


def pointing_chance(mask: np.ndarray, margin: float = POINTING_MARGIN) -> float:
    """Hit probability of a uniformly random point: the share of pixels within the margin."""
    return float((distance_to_lesion(mask) <= margin_px(np.shape(mask), margin)).mean())


def energy_in_lesion(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's sum inside the lesion; NaN for an all-zero map."""
    cam = np.asarray(cam, dtype=np.float64)
    total = cam.sum()
    return float(cam[np.asarray(mask) > 0].sum() / total) if total > 0 else math.nan


def localization(cams: np.ndarray, masks: np.ndarray, labels: Sequence[int],
                 margin: float = POINTING_MARGIN) -> dict[str, dict]:
    """Pointing game and energy in lesion per true class, over the cases whose mask is not empty.

    Args:
        cams: ``(N, H, W)`` maps in [0, 1].
        masks: ``(N, H, W)`` lesion masks (cases with an empty mask are left out).
        labels: ``(N,)`` true class indices into ``CLASSES``.

    Returns:
        ``{class: {"n", "pointing_hit_rate", "pointing_chance", "energy_in_lesion", "lesion_area"}}``
        for each class with at least one lesion case (rates and shares are means over its cases).
    """
    rows: dict[str, list[tuple[float, ...]]] = {}
    for cam, mask, label in zip(cams, masks, labels):
        if not np.any(mask):
            continue
        rows.setdefault(CLASSES[int(label)], []).append((
            float(pointing_hit(cam, mask, margin)), pointing_chance(mask, margin),
            energy_in_lesion(cam, mask), float(np.mean(np.asarray(mask) > 0))))
    out = {}
    for name, values in rows.items():
        v = np.asarray(values)
        out[name] = {"n": len(values), "pointing_hit_rate": float(v[:, 0].mean()), "pointing_chance": float(v[:, 1].mean()),
                     "energy_in_lesion": float(np.nanmean(v[:, 2])) if np.isfinite(v[:, 2]).any() else math.nan,
                     "lesion_area": float(v[:, 3].mean())}
    return out


def rank_correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """``(N,)`` Spearman rho between paired ``(N, H, W)`` maps; NaN where a map is constant."""
    rhos = []
    for a, b in zip(maps_a, maps_b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            rhos.append(math.nan)  # no ranking to compare (e.g. an all-zero map)
        else:
            rhos.append(float(spearmanr(a.ravel(), b.ravel()).statistic))
    return np.asarray(rhos, dtype=np.float64)


def randomization_summary(rhos: np.ndarray, max_rho: float = RANDOMIZATION_MAX_RHO) -> dict:
    """``{"n", "n_undefined", "median_rho", "mean_rho", "max_rho", "passed"}``: passed when the
    median |rho| over the defined pairs is below ``max_rho`` (a constant map counts as undefined)."""
    rhos = np.asarray(rhos, dtype=np.float64)
    defined = rhos[np.isfinite(rhos)]
    median = float(np.median(defined)) if len(defined) else math.nan
    return {"n": int(len(rhos)), "n_undefined": int(len(rhos) - len(defined)), "median_rho": median,
            "mean_rho": float(defined.mean()) if len(defined) else math.nan,
            "max_rho": float(defined.max()) if len(defined) else math.nan,
            "threshold": max_rho, "passed": bool(len(defined) and abs(median) < max_rho)}


def randomization_test(model, images, classes: Sequence[int], explain, seed: int = 0,
                       max_rho: float = RANDOMIZATION_MAX_RHO) -> dict:
    """Model-parameter randomization test of ``explain`` on ``model``.

    Args:
        model: the trained model (a fold model or an ensemble).
        images: ``(N, C, H, W)`` as the model sees them.
        classes: ``(N,)`` the class each image is explained for (the same for both models).
        explain: ``(model, images, classes) -> (N, H, W)`` maps (``explain.explainer(...)``).
        seed: seed of the re-initialisation.

    Returns:
        ``randomization_summary`` of the per-image rhos, plus ``"rhos"`` (list).
    """
    from lung_effnet.explain.gradcam import randomized_copy

    trained = explain(model, images, classes)
    randomized = explain(randomized_copy(model, seed), images, classes)
    rhos = rank_correlations(trained, randomized)
    return {**randomization_summary(rhos, max_rho), "rhos": [None if math.isnan(r) else r for r in rhos]}

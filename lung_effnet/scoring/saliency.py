"""``score --saliency``: one self-contained HTML page per series with Grad-CAM overlays on its key
slices (the ``top_k`` slices averaged into the series result), most abnormal first.

Maps come from ``lung_effnet.explain.gradcam.grad_cam`` with an integer class (the series' predicted
class), the batch-safe way to call it (``lung_effnet.explain.gradcam``, module docstring); the page is rendered by
``lung_effnet.explain.html.write_case_report``. Pages are written under a temporary name and renamed,
so a killed run never leaves a half page that a resumed run would take as done.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.io.names import safe_file_name


def report_name(series_uid: str) -> str:
    """``reports/<series>-<hash>.html``: the series UID or relative path made a safe, bounded file
    name that no other series gets (``io.names.safe_file_name``)."""
    return "reports/" + safe_file_name(series_uid, ".html")


def write_series_report(model, images: np.ndarray, slice_indices: list[int], slice_probs: np.ndarray,
                        item: dict, out_dir: Path) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """Explain the key slices of one series and write its page.

    Args:
        model: the fold ensemble (``(B, C, S, S)`` in [0, 1] -> ``(B, 3)`` probabilities).
        images: ``(K, C, S, S)`` the key slices as the model saw them.
        slice_indices: their slice indices in the series, most abnormal first.
        slice_probs: ``(K, 3)`` their probabilities.
        item: the series row so far (``path``, ``series_uid``, ``predicted``, ``probs``, ``slices``).

    Returns:
        The page's path relative to ``out_dir``, and ``(plane, map)`` of the most abnormal slice,
        each ``(S, S)`` in [0, 1] (``score --dicom-out`` draws its overlay from them).
    """
    import torch

    from lung_effnet.explain.gradcam import grad_cam
    from lung_effnet.explain.html import Case, write_case_report

    x = torch.from_numpy(np.ascontiguousarray(images)).float().to(next(model.parameters()).device)
    maps = grad_cam(model, x, class_idx=CLASSES.index(item["predicted"]))  # (K, S, S) in [0, 1], 1 = most important
    planes = images[:, images.shape[1] // 2].astype(np.float32)  # the slice itself (the middle channel in 2.5D)
    files = {k: f for k, f, *_ in item["slices"]}
    cases = [Case(image=plane, cam=cam, probs=list(p), predicted=item["predicted"], group="Key slices, most abnormal first",
                  caption=f"slice {k} ({files[k]}), abnormality {1 - p[CLASSES.index('normal')]:.3f}")
             for k, plane, cam, p in zip(slice_indices, planes, maps, slice_probs)]
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, item["probs"]))
    intro = (f"Series {item['series_uid']} ({item['path']}): predicted {item['predicted']} ({probs}), the mean of its "
             f"{len(cases)} most abnormal slices. Grad-CAM for '{item['predicted']}' on each of them.")
    name = report_name(item["series_uid"])
    final = out_dir / name
    tmp = final.with_name(f".{final.name}.tmp")
    write_case_report(tmp, f"lung-effnet score: {item['path']}", cases, intro=intro)
    os.replace(tmp, final)
    return name, (planes[0], maps[0])

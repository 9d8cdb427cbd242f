"""``score --saliency``: one self-contained HTML page per series with Grad-CAM overlays on its key
slices (the ``top_k`` slices averaged into the series result), most abnormal first.

Maps come from ``lung_effnet.explain.gradcam.grad_cam`` with an integer class (the series' predicted
class), the batch-safe way to call it (``lung_effnet.explain.gradcam``, module docstring); the page is rendered by
``lung_effnet.explain.html.write_case_report``. Pages are written under a temporary name and renamed,
so a killed run never leaves a half page that a resumed run would take as done.

Each page is titled by the series' folder or file (the UID in small print) and carries the model's
context (``model_context``): the out-of-fold AUROC and saliency checks of the ``train`` run that
wrote the model folder, read from that run's output folder, or "not recorded".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.explain.html import RunContext
from lung_effnet.io.names import display_name, safe_file_name


def report_name(series_uid: str) -> str:
    """``reports/<series>-<hash>.html``: the series UID or relative path made a safe, bounded file
    name that no other series gets (``io.names.safe_file_name``)."""
    return "reports/" + safe_file_name(series_uid, ".html")


def model_context(model: str | Path) -> RunContext:
    """What the ``train`` run behind ``model`` (what ``score --model`` accepts) measured: its
    ``cv_summary.json`` and ``saliency/checks.json``, read from the run's output folder (``model``
    itself, or the folder that holds the model folder, as ``train`` writes them). An MLflow model URI,
    a model folder moved away from its run, or an unreadable file: figures "not recorded", with why."""
    from lung_effnet.models.predictor import is_model_uri, model_folder

    text = str(model)
    if is_model_uri(text):
        return RunContext(source="the model was loaded from MLflow; open its train run for the figures")
    folder = model_folder(text)
    run_dir = folder.parent
    if not (run_dir / "cv_summary.json").is_file():
        return RunContext(source=f"no cv_summary.json beside the model folder {folder}")
    try:
        summary = json.loads((run_dir / "cv_summary.json").read_text(encoding="utf-8"))
        checks_file = run_dir / "saliency" / "checks.json"
        checks = json.loads(checks_file.read_text(encoding="utf-8")) if checks_file.is_file() else {}
    except (OSError, ValueError) as exc:  # a damaged file must not stop scoring
        return RunContext(source=f"{run_dir}: the run's summary is not readable ({type(exc).__name__})")
    if not isinstance(summary, dict) or not isinstance(checks, dict):
        return RunContext(source=f"{run_dir}: cv_summary.json is not a run summary")
    return RunContext.from_summary(summary, checks, source=f"not in {run_dir / 'cv_summary.json'}")


def write_series_report(model, images: np.ndarray, slice_indices: list[int], slice_probs: np.ndarray,
                        item: dict, out_dir: Path, context: RunContext | None = None) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """Explain the key slices of one series and write its page.

    Args:
        model: the fold ensemble (``(B, C, S, S)`` in [0, 1] -> ``(B, 3)`` probabilities).
        images: ``(K, C, S, S)`` the key slices as the model saw them.
        slice_indices: their slice indices in the series, most abnormal first.
        slice_probs: ``(K, 3)`` their probabilities.
        item: the series row so far (``path``, ``series_uid``, ``predicted``, ``probs``, ``slices``).
        context: the model's training run (``model_context``); ``None``: its figures show as "not recorded".

    Returns:
        The page's path relative to ``out_dir``, and ``(plane, map)`` of the most abnormal slice,
        each ``(S, S)`` in [0, 1] (``score --dicom-out`` draws its overlay from them).
    """
    import torch

    from lung_effnet.explain.gradcam import grad_cam
    from lung_effnet.explain.html import Case, fmt_probability, write_case_report

    x = torch.from_numpy(np.ascontiguousarray(images)).float().to(next(model.parameters()).device)
    maps = grad_cam(model, x, class_idx=CLASSES.index(item["predicted"]))  # (K, S, S) in [0, 1], 1 = most important
    planes = images[:, images.shape[1] // 2].astype(np.float32)  # the slice itself (the middle channel in 2.5D)
    files = {k: f for k, f, *_ in item["slices"]}
    cases = [Case(image=plane, cam=cam, probs=list(p), predicted=item["predicted"], group="Key slices, most abnormal first",
                  caption=f"slice {k} ({display_name(files[k])}), abnormality {fmt_probability(1 - p[CLASSES.index('normal')])}")
             for k, plane, cam, p in zip(slice_indices, planes, maps, slice_probs)]
    probs = ", ".join(f"{c} {fmt_probability(p)}" for c, p in zip(CLASSES, item["probs"]))
    intro = (f"Predicted {item['predicted']} ({probs}), the mean of its {len(cases)} most abnormal slices. "
             f"Grad-CAM for '{item['predicted']}' on each of them, by the fold ensemble (the mean of its fold models' maps).")
    # a series lying directly in --input has the path "."; name it so rather than by a dot
    title = display_name(item["path"]) if item["path"] not in ("", ".") else "the --input folder itself"
    subtitle = f"Series Instance UID {item['series_uid']}" if item["series_uid"] != item["path"] else ""
    name = report_name(item["series_uid"])
    final = out_dir / name
    tmp = final.with_name(f".{final.name}.tmp")
    write_case_report(tmp, title, cases, intro=intro, subtitle=subtitle,
                      context=context or RunContext(source="no model context given to the page"))
    os.replace(tmp, final)
    return name, (planes[0], maps[0])

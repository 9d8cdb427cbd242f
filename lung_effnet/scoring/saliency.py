"""``score --saliency``: one self-contained HTML page per series with Grad-CAM overlays on its key
slices (the ``top_k`` slices averaged into the series result).

Maps come from ``lung_effnet.explain.grad_cam`` with an integer class (the series' predicted
class), which is the batch-safe way to call it (DESIGN.md, "Known traps"). The page is rendered
here by ``render_html`` (inline PNGs, no external files); when ``lung_effnet.report`` offers a
series report, ``render_html`` is the one place to hand over to it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .. import CLASSES
from .journal import write_atomic


class SaliencyUnavailable(RuntimeError):
    """``--saliency`` was asked for but the Grad-CAM module cannot be imported."""


def check_available() -> None:
    try:
        from ..explain import grad_cam  # noqa: F401
    except ImportError as exc:
        raise SaliencyUnavailable(f"--saliency needs lung_effnet.explain.grad_cam, which cannot be imported ({exc})") from None


def report_name(series_uid: str) -> str:
    """``reports/<series>.html``, the series UID or relative path made safe as a file name."""
    return "reports/" + "".join(c if c.isalnum() or c in "._-" else "_" for c in series_uid) + ".html"


def write_series_report(model, images: np.ndarray, slice_indices: list[int], slice_probs: np.ndarray,
                        item: dict, out_dir: Path) -> str:
    """Explain the key slices of one series and write its page; returns its path relative to ``out_dir``.

    Args:
        model: the fold ensemble (``(B, C, S, S)`` in [0, 1] -> ``(B, 3)`` probabilities).
        images: ``(K, C, S, S)`` the key slices as the model saw them.
        slice_indices: their slice indices in the series, most abnormal first.
        slice_probs: ``(K, 3)`` their probabilities.
        item: the series row so far (``path``, ``series_uid``, ``predicted``, ``probs``).
    """
    import torch

    from ..explain import grad_cam

    class_idx = CLASSES.index(item["predicted"])
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    device = next(model.parameters()).device
    maps = grad_cam(model, x.to(device), class_idx=class_idx)  # (K, S, S) in [0, 1], 1 = most important
    name = report_name(item["series_uid"])
    write_atomic(out_dir / name, render_html(item, x[:, x.shape[1] // 2].numpy(), maps, slice_indices, slice_probs))
    return name


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``(S, S)`` grey in [0, 1] + ``(S, S)`` map in [0, 1] -> ``(S, S, 3)`` RGB (jet where important)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    weight = alpha * cam[..., None]  # unimportant pixels stay grey, so the anatomy remains readable
    return (1 - weight) * image[..., None] + weight * heat


def render_html(item: dict, planes: np.ndarray, maps: np.ndarray, slice_indices: list[int],
                slice_probs: np.ndarray) -> str:
    """The page: series result, then per key slice the input and its overlay. ``planes``: ``(K, S, S)``."""
    esc = html.escape
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, item["probs"]))
    rows = []
    for k, plane, cam, p in zip(slice_indices, planes, maps, slice_probs):
        label = ", ".join(f"{c} {v:.3f}" for c, v in zip(CLASSES, p))
        rows.append(f"<figure><img src='data:image/png;base64,{_png(np.repeat(plane[..., None], 3, -1))}'>"
                    f"<img src='data:image/png;base64,{_png(overlay(plane, cam))}'>"
                    f"<figcaption>slice {k}: {esc(label)}</figcaption></figure>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(item['series_uid'])}</title>"
            "<style>body{font-family:sans-serif}img{width:256px;image-rendering:pixelated;margin:2px}"
            "figure{display:inline-block}</style></head><body>"
            f"<h1>{esc(item['path'])}</h1><p>series {esc(item['series_uid'])}</p>"
            f"<p>predicted <b>{esc(item['predicted'])}</b> ({esc(probs)}); Grad-CAM for class "
            f"{esc(item['predicted'])} on the key slices, most abnormal first (left: model input, right: overlay)</p>"
            + "".join(rows) + "</body></html>\n")

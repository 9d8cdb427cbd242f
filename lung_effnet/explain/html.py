"""Self-contained HTML saliency pages: one file, images embedded as base64 PNG, inline CSS, no
external URL, so it opens offline and can be mailed or archived as it is.

``write_case_report(path, title, cases, checks=None)`` renders any list of ``Case`` (a slice, its
map, probabilities, prediction): the out-of-fold report of ``report`` and batch scoring's
per-series pages both use it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.cases{display:flex;flex-wrap:wrap;gap:16px}.case{border:1px solid #ddd;border-radius:6px;padding:8px;width:520px}
.case img{width:100%}.right{color:#1a7f37}.wrong{color:#cf222e}.pass{color:#1a7f37;font-weight:bold}
.fail{color:#cf222e;font-weight:bold}.note{color:#555;font-size:13px}.caption{font-size:12px;color:#555;word-break:break-all}
"""


@dataclass
class Case:
    """One explained slice.

    Attributes:
        image: ``(H, W)`` in [0, 1] as the model sees it (HU sources: the lung window).
        cam: ``(H, W)`` saliency in [0, 1], 1 = most important.
        probs: ``(3,)`` class probabilities in ``CLASSES`` order.
        predicted: the class explained (normally the predicted one).
        true_label: the reference class, when known.
        caption: free text under the images (file, slice, fold...).
        mask: optional ``(H, W)`` lesion mask, outlined on the overlay.
        group: heading of the section the case is listed under (cases are rendered in order).
        details: small per-case figures shown as ``key: value`` (e.g. the pointing-game hit).
    """

    image: np.ndarray
    cam: np.ndarray
    probs: Sequence[float]
    predicted: str
    true_label: str | None = None
    caption: str = ""
    mask: np.ndarray | None = None
    group: str = ""
    details: dict[str, str] = field(default_factory=dict)


def case_png(case: Case, method: str = "Grad-CAM") -> bytes:
    """PNG of the slice beside its overlay (jet map over the slice, colour bar 0-1, lesion outline)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0), dpi=90)
    left, right = fig.subplots(1, 2)
    left.imshow(case.image, cmap="gray", vmin=0, vmax=1)
    left.set_title("slice (lung window)", fontsize=9)
    right.imshow(case.image, cmap="gray", vmin=0, vmax=1)
    overlay = right.imshow(case.cam, cmap="jet", vmin=0, vmax=1, alpha=0.45)
    if case.mask is not None and np.any(case.mask):
        right.contour(np.asarray(case.mask) > 0, levels=[0.5], colors="white", linewidths=0.8)
    right.set_title(f"{method} for '{case.predicted}'" + (" (lesion outlined)" if case.mask is not None and np.any(case.mask) else ""),
                    fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(overlay, ax=right, fraction=0.046, pad=0.03, label="importance (0-1)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _case_html(case: Case, method: str) -> str:
    png = base64.b64encode(case_png(case, method)).decode("ascii")
    verdict = ""
    if case.true_label:
        right = case.true_label == case.predicted
        verdict = f' <span class="{"right" if right else "wrong"}">{"right" if right else "wrong"}</span>'
    probs = "".join(f"<td>{p:.3f}</td>" for p in case.probs)
    details = "".join(f"<div class='note'>{html.escape(k)}: {html.escape(str(v))}</div>" for k, v in case.details.items())
    true = f"true <b>{html.escape(case.true_label)}</b> &middot; " if case.true_label else ""
    return (f"<div class='case'><div>{true}predicted <b>{html.escape(case.predicted)}</b>{verdict}</div>"
            f"<table><tr>{''.join(f'<th>{c}</th>' for c in CLASSES)}</tr><tr>{probs}</tr></table>"
            f"<img alt='slice and saliency overlay' src='data:image/png;base64,{png}'>{details}"
            f"<div class='caption'>{html.escape(case.caption)}</div></div>")


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def checks_html(checks: dict) -> str:
    """The faithfulness checks (``build_oof_report``'s ``checks`` dict) as HTML tables."""
    parts = ["<h2>Faithfulness checks</h2>"]
    rand = checks.get("randomization")
    if rand:
        verdict = "<span class='pass'>passed</span>" if rand["passed"] else "<span class='fail'>FAILED</span>"
        parts.append(
            f"<h3>Model-parameter randomization test {verdict}</h3><p class='note'>Spearman rank correlation between "
            f"each map of the trained model and of a copy with re-initialised weights (Adebayo et al. 2018), over "
            f"{rand['n']} cases ({rand['n_undefined']} undefined: a constant map). Low means the map depends on what "
            f"the model learned; passes when the median is below {rand['threshold']}.</p>"
            f"<table><tr><th>median rho</th><th>mean rho</th><th>max rho</th></tr><tr><td>{_fmt(rand['median_rho'])}</td>"
            f"<td>{_fmt(rand['mean_rho'])}</td><td>{_fmt(rand['max_rho'])}</td></tr></table>")
    loc = checks.get("localization")
    if loc:
        rows = "".join(f"<tr><td>{c}</td><td>{v['n']}</td><td>{_fmt(v['pointing_hit_rate'])}</td><td>{_fmt(v['pointing_chance'])}</td>"
                       f"<td>{_fmt(v['energy_in_lesion'])}</td><td>{_fmt(v['lesion_area'])}</td></tr>" for c, v in loc.items())
        parts.append(
            "<h3>Localization on lesion masks, per true class</h3><p class='note'>Maps for the true class. Pointing game: the map's maximum lies "
            f"in the lesion or within {_fmt(checks.get('pointing_margin_px', math.nan))} px of it (Zhang et al. 2016). Energy: "
            "share of the map inside the lesion. Each beside its chance level: a random point, a uniform map.</p>"
            "<table><tr><th>class</th><th>cases</th><th>pointing hit rate</th><th>chance</th><th>energy in lesion</th>"
            f"<th>chance (lesion area)</th></tr>{rows}</table>")
    elif "localization" in checks:
        parts.append("<p class='note'>No lesion masks for these cases: localization not measured.</p>")
    for note in checks.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return "".join(parts)


def write_case_report(path: str | Path, title: str, cases: Sequence[Case], checks: dict | None = None,
                      intro: str = "", method: str = "Grad-CAM") -> Path:
    """Write one self-contained HTML file: ``title``, ``intro`` (plain text), the ``checks`` tables
    (if any), then every case under its ``group`` heading, in order. Returns ``path``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        body.append(f"<p class='note'>{html.escape(intro)}</p>")
    if checks:
        body.append(checks_html(checks))
    group = None
    open_div = False
    for case in cases:
        if case.group != group or not open_div:
            body.append(("</div>" if open_div else "") + (f"<h2>{html.escape(case.group)}</h2>" if case.group else "")
                        + "<div class='cases'>")
            group, open_div = case.group, True
        body.append(_case_html(case, method))
    if open_div:
        body.append("</div>")
    if not cases:
        body.append("<p class='note'>No cases.</p>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path

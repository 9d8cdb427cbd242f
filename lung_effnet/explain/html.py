"""Self-contained HTML saliency pages: one file, images embedded as base64 PNG, inline CSS, no
external URL, so it opens offline and can be mailed or archived as it is.

``write_case_report(path, title, cases, checks=None)`` renders any list of ``Case`` (a slice, its
map, probabilities, prediction): the out-of-fold report of ``report`` and batch scoring's
per-series pages both use it. Every page says it is for research use only and, given a
``RunContext``, what the model's training run measured (out-of-fold AUROC with its CI, where its
maps fell beside chance), so a map is never read without knowing how good the model behind it is.
Numbers are written to significant digits (``fmt_number``): 0.00026, not 0.000.
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
.case img{width:100%}.right{color:#1a7f37}.wrong{color:#cf222e}
.note{color:#555;font-size:13px}.caption{font-size:12px;color:#555;word-break:break-all}
.subtitle{font-size:12px;color:#555;word-break:break-all;margin-top:-8px}.warn{color:#9a6700}
.context{border:1px solid #d0d7de;border-radius:6px;background:#f6f8fa;padding:4px 12px;margin:12px 0}
.ruo{font-weight:bold;color:#9a6700}
"""

NOT_FOR_DIAGNOSIS = "Research use only, not for diagnosis."
CHANCE_AUROC = 0.5


def fmt_number(value, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, without an exponent between 1e-6 and 1e6:
    0.00026, 0.656, 6.43, 1200; ``n/a`` for NaN / None; integers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if value == 0 or math.isinf(value):
        return "0" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    if not -6 <= magnitude < 6:
        return f"{value:.{digits}g}"
    decimals = max(digits - 1 - magnitude, 0)
    text = f"{round(value, decimals):.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_probability(p: float) -> str:
    """A probability with three decimals, or two significant digits of its distance from 0 or 1
    where that is under 0.01 (0.00026, 0.99974), so none reads as a 0.000 or 1.000 it is not."""
    p = float(p)
    if math.isnan(p):
        return "n/a"
    tail = min(p, 1 - p)
    if tail <= 0:
        return "1" if p >= 1 else "0"
    if tail < 1e-6:
        return f"{p:.2g}" if p < 0.5 else "> 0.999999"
    decimals = 3 if tail >= 0.01 else 1 - math.floor(math.log10(tail))
    return f"{p:.{decimals}f}"


def fmt_percent(share: float, digits: int = 2) -> str:
    """A share in [0, 1] as a percentage to ``digits`` significant digits (0.68 -> 68%, 0.0126 -> 1.3%)."""
    return "n/a" if share is None or math.isnan(float(share)) else f"{fmt_number(100 * float(share), digits)}%"


@dataclass
class RunContext:
    """What the training run of the explained model measured, shown at the top of every page.

    Attributes:
        auroc_macro: out-of-fold macro AUROC (``cv_summary.json``: ``oof.auroc_macro``), ``None``
            when not recorded.
        auroc_ci95: its patient-bootstrap 95% CI.
        n_cases, n_patients: out-of-fold slices and patients it was measured on.
        localization: the run's saliency checks per true class (``checks.json``: ``localization``).
        pointing_margin_px: the pointing game's tolerance those were measured with.
        source: where the figures come from, or why there are none (shown with "not recorded").
    """

    auroc_macro: float | None = None
    auroc_ci95: tuple[float, float] | None = None
    n_cases: int | None = None
    n_patients: int | None = None
    localization: dict | None = None
    pointing_margin_px: float | None = None
    source: str = ""

    @classmethod
    def from_summary(cls, summary: dict | None, checks: dict | None = None, source: str = "") -> RunContext:
        """From a run's ``cv_summary.json`` and its saliency ``checks.json`` (either may be empty)."""
        oof = (summary or {}).get("oof") or {}
        auroc = oof.get("auroc_macro")
        ci = oof.get("auroc_macro_ci95")
        n = oof.get("n_slices", oof.get("n"))
        return cls(auroc_macro=float(auroc) if isinstance(auroc, (int, float)) and not math.isnan(auroc) else None,
                   auroc_ci95=(float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
                   n_cases=int(n) if isinstance(n, (int, float)) and not math.isnan(n) else None,
                   n_patients=(summary or {}).get("n_patients"),
                   localization=(checks or {}).get("localization") or None,
                   pointing_margin_px=(checks or {}).get("pointing_margin_px"), source=source)

    def auroc_text(self) -> str:
        """``0.66 (95% CI 0.19-1.00)``, or ``not recorded``."""
        if self.auroc_macro is None:
            return "not recorded" + (f" ({self.source})" if self.source else "")
        ci = f" (95% CI {self.auroc_ci95[0]:.2f}-{self.auroc_ci95[1]:.2f})" if self.auroc_ci95 else ""
        return f"{self.auroc_macro:.2f}{ci}"

    def at_chance(self) -> bool:
        """Whether the AUROC's CI (or the AUROC, without one) does not exclude chance (0.5)."""
        if self.auroc_macro is None:
            return False
        low = self.auroc_ci95[0] if self.auroc_ci95 and not math.isnan(self.auroc_ci95[0]) else self.auroc_macro
        return low <= CHANCE_AUROC



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


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib figure (``Figure`` built without pyplot, or a pyplot one).
    In a notebook, ``IPython.display.Image(figure_png(fig))`` shows it as an image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def map_range(cam: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` colour limits for a map: its own minimum and maximum (``(0, 1)`` for a
    constant map), so the colours use the range the map has."""
    low, high = float(np.min(cam)), float(np.max(cam))
    return (low, high) if high - low > 1e-6 else (0.0, 1.0)


def case_png(case: Case, method: str = "Grad-CAM") -> bytes:
    """PNG of the slice beside its overlay (jet map over the slice with a colour bar from the map's
    minimum to its maximum, lesion outline)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0), dpi=90)
    left, right = fig.subplots(1, 2)
    left.imshow(case.image, cmap="gray", vmin=0, vmax=1)
    left.set_title("slice (lung window)", fontsize=9)
    right.imshow(case.image, cmap="gray", vmin=0, vmax=1)
    low, high = map_range(case.cam)
    overlay = right.imshow(case.cam, cmap="jet", vmin=low, vmax=high, alpha=0.45)
    if case.mask is not None and np.any(case.mask):
        right.contour(np.asarray(case.mask) > 0, levels=[0.5], colors="white", linewidths=0.8)
    right.set_title(f"{method} for '{case.predicted}'" + (" (lesion outlined)" if case.mask is not None and np.any(case.mask) else ""),
                    fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(overlay, ax=right, fraction=0.046, pad=0.03)
    bar.set_label("importance (this map's range)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _case_html(case: Case, method: str) -> str:
    png = base64.b64encode(case_png(case, method)).decode("ascii")
    verdict = ""
    if case.true_label:
        right = case.true_label == case.predicted
        verdict = f' <span class="{"right" if right else "wrong"}">{"right" if right else "wrong"}</span>'
    probs = "".join(f"<td>{fmt_probability(p)}</td>" for p in case.probs)
    details = "".join(f"<div class='note'>{html.escape(k)}: {html.escape(str(v))}</div>" for k, v in case.details.items())
    true = f"true <b>{html.escape(case.true_label)}</b> &middot; " if case.true_label else ""
    return (f"<div class='case'><div>{true}predicted <b>{html.escape(case.predicted)}</b>{verdict}</div>"
            f"<table><tr>{''.join(f'<th>{c}</th>' for c in CLASSES)}</tr><tr>{probs}</tr></table>"
            f"<img alt='slice and saliency overlay' src='data:image/png;base64,{png}'>{details}"
            f"<div class='caption'>{html.escape(case.caption)}</div></div>")


def _fmt(value) -> str:
    return html.escape(value) if isinstance(value, str) else fmt_number(value)


def localization_sentences(localization: dict, margin_px: float | None = None) -> list[str]:
    """Each class's localization figures (``checks.localization``) in words, beside chance: where the
    map's peak falls and how much of the map lies in the lesion, against a random point and a
    uniform map."""
    within = f" (or within {fmt_number(margin_px, 2)} px of it)" if margin_px is not None and not math.isnan(margin_px) else ""
    sentences = []
    for name, v in localization.items():
        hit, chance = v.get("pointing_hit_rate", math.nan), v.get("pointing_chance", math.nan)
        sentence = (f"On {v.get('n', '?')} {name} slices with a lesion mask, the map's peak falls on the lesion{within} in "
                    f"{fmt_percent(hit)} of them; a random point would in {fmt_percent(chance)}.")
        energy, area = v.get("energy_in_lesion", math.nan), v.get("lesion_area", math.nan)
        if not (math.isnan(energy) or math.isnan(area)):
            sentence += (f" {fmt_percent(energy)} of the map's weight lies in the lesion, which covers {fmt_percent(area)} "
                         f"of the slice (what a map with no information would put there).")
        sentences.append(sentence)
    return sentences


def context_html(context: RunContext | None, with_localization: bool = True) -> str:
    """The box at the top of every page: research use only, the model's out-of-fold AUROC with its
    CI (or "not recorded"), and (``with_localization``) where the run's maps fell beside chance."""
    parts = [f"<p class='ruo'>{NOT_FOR_DIAGNOSIS}</p>"]
    context = context or RunContext(source="no training run given")
    over = ""
    if context.auroc_macro is not None and (context.n_cases or context.n_patients):
        counts = [f"{context.n_cases} slices"] if context.n_cases else []
        counts += [f"{context.n_patients} patients"] if context.n_patients else []
        over = f", over {' of '.join(counts)}"
    text = f"The model's out-of-fold macro AUROC in its training run's cross-validation: {context.auroc_text()}{over}."
    if context.at_chance():
        text += (f" Its CI does not exclude {CHANCE_AUROC} (chance): the model may not tell the classes apart, so its "
                 f"maps show what it looks at, not where disease is.")
    parts.append(f"<p>{html.escape(text)}</p>")
    if with_localization:
        if context.localization:
            reading = " ".join(localization_sentences(context.localization, context.pointing_margin_px))
            lead = "Where the run's out-of-fold maps (for the true class) fell: "
            parts.append(f"<p>{html.escape(lead + reading)}</p>")
        else:
            parts.append("<p class='note'>Where the run's maps fall on lesions: not recorded (no lesion masks, "
                         "or no saliency checks beside the model).</p>")
    return f"<div class='context'>{''.join(parts)}</div>"


def _randomization_html(rand: dict, context: RunContext | None) -> str:
    """The randomization test, worded as what it tests (do the maps depend on the weights?) with
    the model's AUROC beside it: a model at chance has maps that depend on its weights too."""
    median, threshold = rand["median_rho"], rand["threshold"]
    if rand["n"] - rand["n_undefined"] == 0:
        headline, cls = "not measured (every map was constant)", "warn"
        reading = "No map varied, so the test could not be run."
    elif rand["passed"]:
        headline, cls = "the maps depend on the trained weights", "note"
        reading = (f"Median Spearman rho {fmt_number(median, 2)} (below {threshold}): the maps change when the weights are "
                   f"re-initialised, so they reflect what this model learned rather than the image alone.")
    else:
        headline, cls = "the maps barely depend on the trained weights", "warn"
        reading = (f"Median Spearman rho {fmt_number(median, 2)} (not below {threshold}): a model with random weights "
                   f"draws much the same maps, so they show the image more than what this model learned.")
    auroc = (context or RunContext(source="not given")).auroc_text()
    return (f"<h3>Model-parameter randomization test: <span class='{cls}'>{headline}</span></h3>"
            f"<p>{html.escape(reading)} This tests the maps, not the model: it says nothing about whether the model "
            f"is right (its out-of-fold macro AUROC: {html.escape(auroc)}).</p>"
            f"<p class='note'>Spearman rank correlation between each map of the trained model and of a copy with "
            f"re-initialised weights (Adebayo et al. 2018), over {rand['n']} cases ({rand['n_undefined']} undefined: a "
            f"constant map).</p>"
            f"<table><tr><th>median rho</th><th>mean rho</th><th>max rho</th></tr><tr><td>{_fmt(median)}</td>"
            f"<td>{_fmt(rand['mean_rho'])}</td><td>{_fmt(rand['max_rho'])}</td></tr></table>")


def checks_html(checks: dict, context: RunContext | None = None) -> str:
    """The faithfulness checks (``build_oof_report``'s ``checks`` dict) as HTML: each in words, then
    its table; ``context`` gives the model's AUROC shown beside the randomization test."""
    parts = ["<h2>Faithfulness checks</h2>"]
    rand = checks.get("randomization")
    if rand:
        parts.append(_randomization_html(rand, context))
    loc = checks.get("localization")
    margin = checks.get("pointing_margin_px", math.nan)
    if loc:
        rows = "".join(f"<tr><td>{c}</td><td>{v['n']}</td><td>{_fmt(v['pointing_hit_rate'])}</td><td>{_fmt(v['pointing_chance'])}</td>"
                       f"<td>{_fmt(v['energy_in_lesion'])}</td><td>{_fmt(v['lesion_area'])}</td></tr>" for c, v in loc.items())
        reading = "".join(f"<p>{html.escape(t)}</p>" for t in localization_sentences(loc, margin))
        parts.append(
            f"<h3>Localization on lesion masks, per true class</h3>{reading}<p class='note'>Maps for the true class. "
            f"Pointing game: the map's maximum lies in the lesion or within {fmt_number(margin, 2)} px of it (Zhang et al. "
            "2016). Energy: share of the map inside the lesion. Each beside its chance level: a random point, a uniform map.</p>"
            "<table><tr><th>class</th><th>cases</th><th>pointing hit rate</th><th>chance</th><th>energy in lesion</th>"
            f"<th>chance (lesion area)</th></tr>{rows}</table>")
    elif "localization" in checks:
        parts.append("<p class='note'>No lesion masks for these cases: localization not measured.</p>")
    for note in checks.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return "".join(parts)


MAP_SCALE_NOTE = ("Each overlay's colours run from that map's lowest to its highest value (its colour bar gives them); "
                  "1 is the peak of a single model's map, and an ensemble's map is the mean of its fold models' maps. "
                  "Compare where maps point, not how bright they are from one slice to the next.")


def write_case_report(path: str | Path, title: str, cases: Sequence[Case], checks: dict | None = None,
                      intro: str = "", method: str = "Grad-CAM", *, subtitle: str = "",
                      context: RunContext | None = None) -> Path:
    """Write one self-contained HTML file: ``title`` (``subtitle`` in small print under it), the
    context box (``context_html``: research use only, the model's out-of-fold AUROC or "not
    recorded", its localization unless ``checks`` show it), ``intro`` (plain text), the ``checks``
    (if any), then every case under its ``group`` heading, in order. Returns ``path``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        body.append(f"<p class='subtitle'>{html.escape(subtitle)}</p>")
    body.append(context_html(context, with_localization=not (checks and "localization" in checks)))
    if intro:
        body.append(f"<p class='note'>{html.escape(intro)}</p>")
    if checks:
        body.append(checks_html(checks, context))
    if cases:
        body.append(f"<p class='note'>{html.escape(MAP_SCALE_NOTE)}</p>")
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

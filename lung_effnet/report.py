"""Self-contained HTML saliency reports: one file, images embedded as base64 PNG, inline CSS, no
external URL, so it opens offline and can be mailed or archived as it is.

Two levels:

- ``write_case_report(path, title, cases, checks=None)``: renders any list of ``Case`` (a slice, its
  map, probabilities, prediction). Batch scoring uses it for per-series reports.
- ``build_oof_report(run, out_dir)``: the report of a finished ``train`` run: the most confident
  right and wrong out-of-fold cases per true class, each explained by its own fold's model (the one
  that never saw it) on inputs re-created exactly as training saw them (same manifest, same
  preprocessing, same cache), with the faithfulness checks of ``saliency_checks``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import CLASSES

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
            "<h3>Localization on lesion masks, per true class</h3><p class='note'>Pointing game: the map's maximum lies "
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



# ---------------------------------------------------------------- the report of a finished train run


@dataclass
class TrainedRun:
    """What a finished ``train`` run left behind, wherever it lives (its folder, or MLflow).

    Attributes:
        predictor: the fold ensemble; ``predictor.model.members[k]`` is fold ``k``'s model.
        oof: rows of ``oof_predictions.csv`` (``path, patient_id, fold, label, p_<class>, slice_index, ...``).
        manifest: rows of the run's ``ingest/manifest.csv`` (paths absolute), every row training saw.
        summary: ``cv_summary.json`` (empty when the run folder has none yet).
        folder: the local folder holding these files (the run folder, or a download of its artifacts).
        parent_run_id, tracking_uri: the MLflow parent run, when known.
    """

    predictor: object
    oof: list[dict]
    manifest: list[dict]
    summary: dict
    folder: Path
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def config(self):
        return self.predictor.config

    def probabilities(self) -> np.ndarray:
        """``(N, 3)`` out-of-fold probabilities in ``oof`` order."""
        return np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in self.oof])


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def latest_run_id(tracking_uri: str | None = None) -> str:
    """The most recent finished ``train`` parent run (has a ``data_fingerprint`` tag, no parent) in the store."""
    from mlflow.tracking import MlflowClient

    from .tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200) if experiments else []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags and "data_fingerprint" in tags:
            return run.info.run_id
    raise FileNotFoundError(f"no finished lung-effnet train run in the MLflow store {resolve_tracking_uri(tracking_uri)}")


def _download_run(run_id: str, tracking_uri: str | None) -> tuple[Path, dict]:
    import tempfile

    import mlflow.artifacts

    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    folder = Path(tempfile.mkdtemp(prefix=f"lung-effnet-run-{run_id[:8]}-"))
    try:
        for name in ("cv_summary.json", "oof_predictions.csv", "ingest/manifest.csv"):
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=uri))
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(local.read_bytes())  # one layout whatever the store's download does
    except Exception as exc:  # MlflowException (unknown run, missing artifact) or an OSError: one line
        raise FileNotFoundError(f"MLflow run {run_id} in {uri}: cannot fetch its train outputs "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return folder, json.loads((folder / "cv_summary.json").read_text())


def load_run(run: str | Path | None = None, tracking_uri: str | None = None) -> TrainedRun:
    """Open a finished ``train`` run: its output folder, an MLflow parent run id, or ``None``
    (``$LUNG_EFFNET_RUN``, else the latest finished run in the MLflow store).

    Raises:
        FileNotFoundError: no such folder or run, or it lacks the outputs a report needs.
    """
    import os

    from .predictor import load_model

    run = run or os.environ.get("LUNG_EFFNET_RUN") or latest_run_id(tracking_uri)
    folder = Path(run)
    if folder.is_dir():
        for name in ("oof_predictions.csv", "model", "ingest/manifest.csv"):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder}: not a finished train run (no {name})")
        summary = json.loads((folder / "cv_summary.json").read_text()) if (folder / "cv_summary.json").exists() else {}
        predictor = load_model(folder / "model")
        state = json.loads((folder / "mlflow_run.json").read_text()) if (folder / "mlflow_run.json").exists() else {}
        parent, uri = state.get("parent_run_id"), summary.get("mlflow", {}).get("tracking_uri", tracking_uri)
    else:
        folder, summary = _download_run(str(run), tracking_uri)
        predictor = load_model(summary["mlflow"]["model_uri"])
        parent, uri = str(run), summary["mlflow"]["tracking_uri"]
    from .data.manifest import read_manifest

    return TrainedRun(predictor, _read_csv(folder / "oof_predictions.csv"), read_manifest(folder / "ingest" / "manifest.csv"),
                      summary, folder, parent, uri)


def select_cases(run: TrainedRun, top: int) -> list[tuple[int, str]]:
    """``(oof index, group)`` of the ``top`` most confident right and wrong cases per true class
    (confidence = probability of the predicted class), in class order."""
    proba = run.probabilities()
    pred, conf = proba.argmax(1), proba.max(1)
    labels = np.array([CLASSES.index(r["label"]) for r in run.oof])
    chosen = []
    for k, name in enumerate(CLASSES):
        for right in (True, False):
            idx = np.flatnonzero((labels == k) & ((pred == k) == right))
            idx = idx[np.argsort(-conf[idx], kind="stable")][:top]
            chosen += [(int(i), f"true {name}: most confident {'right' if right else 'wrong'}") for i in idx]
    return chosen


def oof_inputs(run: TrainedRun, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, C, S, S)`` float32 in [0, 1] and lesion masks ``(n, S, S)`` bool of OOF rows,
    re-created as training saw them: the run's manifest and preprocessing settings, through the
    preprocessed-tensor cache (computed and cached again if the cache was cleared)."""
    from .cv import default_cache_dir
    from .data.dataset import PlaneReader, load_or_preprocess

    cfg = run.config.data
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    reader = PlaneReader(run.manifest, cfg.context_slices)  # all rows: 2.5D neighbours come from the series
    by_key = {(r["path"], str(r.get("slice_index", ""))): r for r in run.manifest}
    images, masks = [], []
    for i in indices:
        key = (run.oof[i]["path"], str(run.oof[i].get("slice_index", "")))
        if key not in by_key:
            raise FileNotFoundError(f"{key[0]} (slice {key[1]}): out-of-fold row not in the run's manifest")
        image, mask, _ = load_or_preprocess(by_key[key], reader, cfg, cache_dir)
        images.append(image.astype(np.float32))
        masks.append(mask[0] > 0)
    size = cfg.image_size
    if not images:
        return np.zeros((0, 2 * cfg.context_slices + 1, size, size), np.float32), np.zeros((0, size, size), bool)
    return np.stack(images), np.stack(masks)


def explain_oof(run: TrainedRun, indices: Sequence[int], images: np.ndarray, method: str = "gradcam",
                target_layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(n, S, S)`` of OOF rows, each by its own fold's model for its recorded predicted
    class, and that model's probabilities ``(n, 3)`` on the re-created inputs (to check them)."""
    import torch

    from .explain import grad_cam, members_of

    members = members_of(run.predictor.model)
    folds = np.array([int(run.oof[i]["fold"]) for i in indices], dtype=np.int64)
    classes = run.probabilities()[list(indices)].argmax(1) if len(indices) else np.zeros(0, np.int64)
    maps = np.zeros((len(indices), *images.shape[2:]), np.float32)
    probs = np.zeros((len(indices), len(CLASSES)))
    for k in np.unique(folds):
        sel = np.flatnonzero(folds == k)
        x = torch.from_numpy(images[sel])
        maps[sel] = grad_cam(members[k], x, target_layer, classes[sel], method)
        with torch.no_grad():
            members[k].eval()
            probs[sel] = torch.softmax(members[k](x.to(next(members[k].parameters()).device)).float(), 1).cpu().numpy()
    return maps, probs


def _fold_randomization(run: TrainedRun, indices: list[int], images: np.ndarray, method: str,
                        target_layer: str | None, seed: int) -> list:
    """Per-image rhos of the randomization test, each fold's cases against that fold's model."""
    import torch

    from .explain import explainer, members_of
    from .saliency_checks import randomization_test

    members = members_of(run.predictor.model)
    folds = np.array([int(run.oof[i]["fold"]) for i in indices])
    classes = run.probabilities()[indices].argmax(1)
    rhos: list = []
    for k in np.unique(folds):
        sel = np.flatnonzero(folds == k)
        result = randomization_test(members[k], torch.from_numpy(images[sel]), classes[sel],
                                    explainer(target_layer, method), seed=seed + int(k))
        rhos += result["rhos"]
    return rhos


def faithfulness_checks(run: TrainedRun, method: str = "gradcam", target_layer: str | None = None,
                        max_cases: int = 200, n_randomization: int = 16, seed: int = 0) -> dict:
    """The checks every report carries, over up to ``max_cases`` OOF cases (a seeded sample):
    localization per true class on those with a lesion mask, the randomization test on
    ``n_randomization`` of them, and how exactly the recorded OOF probabilities were reproduced."""
    from .saliency_checks import POINTING_MARGIN, localization, margin_px, randomization_summary

    rng = np.random.default_rng(seed)
    by_key = {(r["path"], str(r.get("slice_index", ""))): r for r in run.manifest}
    with_mask = [i for i, r in enumerate(run.oof) if by_key.get((r["path"], str(r.get("slice_index", ""))), {}).get("mask_path")]
    pool = with_mask or list(range(len(run.oof)))
    sample = sorted(rng.choice(pool, size=min(max_cases, len(pool)), replace=False).tolist()) if pool else []
    images, masks = oof_inputs(run, sample)
    maps, probs = explain_oof(run, sample, images, method, target_layer)
    labels = [CLASSES.index(run.oof[i]["label"]) for i in sample]
    rand_idx = sorted(rng.choice(len(sample), size=min(n_randomization, len(sample)), replace=False).tolist()) if sample else []
    rhos = _fold_randomization(run, [sample[j] for j in rand_idx], images[rand_idx], method, target_layer, seed) if rand_idx else []
    size = images.shape[-1] if len(images) else run.config.data.image_size
    grid = _feature_grid(run, size, target_layer)
    return {
        "method": method, "target_layer": target_layer or _default_layer(), "n_cases": len(sample),
        "randomization": randomization_summary(np.array(rhos, dtype=float)) | {"rhos": rhos},
        "localization": localization(maps, masks, labels) if with_mask else {},
        "pointing_margin_px": margin_px((size, size), POINTING_MARGIN),
        "max_abs_probability_difference": float(np.abs(probs - run.probabilities()[sample]).max()) if sample else math.nan,
        "notes": [f"Maps come from a {grid} x {grid} feature grid upsampled to {size} x {size} px: they place "
                  f"evidence to within about {size // max(grid, 1)} px, coarser than small lesions.",
                  "Out-of-fold inputs re-created from the run's manifest and cache; the fold models reproduce the "
                  "recorded out-of-fold probabilities to within the max |difference| in checks.json."],
    }


def _default_layer() -> str:
    from .explain import DEFAULT_TARGET_LAYER

    return DEFAULT_TARGET_LAYER


def _feature_grid(run: TrainedRun, size: int, target_layer: str | None) -> int:
    """Side of the target layer's feature map for a ``size`` input (7 for b0 at 224 px)."""
    import torch

    from .explain import members_of, resolve_target_layer

    member = members_of(run.predictor.model)[0]
    layer = dict(member.named_modules())[resolve_target_layer(member, target_layer)]
    shapes = []
    handle = layer.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape[-1]))
    try:
        with torch.no_grad():
            member.eval()(torch.zeros(1, 2 * run.config.data.context_slices + 1, size, size,
                                      device=next(member.parameters()).device))
    finally:
        handle.remove()
    return int(shapes[-1])


METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}


def _case_details(cam: np.ndarray, mask: np.ndarray) -> dict[str, str]:
    from .saliency_checks import energy_in_lesion, pointing_chance, pointing_hit

    if not mask.any():
        return {}
    return {"pointing game": f"{'hit' if pointing_hit(cam, mask) else 'miss'} (chance {pointing_chance(mask):.2f})",
            "energy in lesion": f"{energy_in_lesion(cam, mask):.2f} (lesion area {mask.mean():.3f})"}


def oof_cases(run: TrainedRun, top: int = 2, method: str = "gradcam", target_layer: str | None = None) -> list[Case]:
    """The report's cases (``select_cases``), explained by their own fold's model."""
    chosen = select_cases(run, top)
    indices = [i for i, _ in chosen]
    images, masks = oof_inputs(run, indices)
    maps, _ = explain_oof(run, indices, images, method, target_layer)
    proba = run.probabilities()
    centre = images.shape[1] // 2 if len(images) else 0  # 2.5D input: the slice itself is the middle channel
    cases = []
    for j, (i, group) in enumerate(chosen):
        row = run.oof[i]
        where = f"{Path(row['path']).parent.name}/{Path(row['path']).name}"
        slice_text = f", slice {row['slice_index']}" if row.get("slice_index") not in (None, "") else ""
        cases.append(Case(image=images[j, centre], cam=maps[j], probs=proba[i].tolist(), predicted=CLASSES[int(proba[i].argmax())],
                          true_label=row["label"], caption=f"{where}{slice_text} - fold {row['fold']} model (never saw it)",
                          mask=masks[j] if masks[j].any() else None, group=group, details=_case_details(maps[j], masks[j])))
    return cases


def build_oof_report(run: TrainedRun | str | Path | None, out_dir: str | Path, method: str = "gradcam", top: int = 2,
                     target_layer: str | None = None, max_check_cases: int = 200) -> dict:
    """Write ``out_dir/report.html`` and ``out_dir/checks.json`` for a finished run (a
    ``TrainedRun``, or what ``load_run`` accepts). Returns ``{"html", "checks_json", "n_cases", "checks"}``."""
    from .explain import METHODS

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    run = run if isinstance(run, TrainedRun) else load_run(run)
    out = Path(out_dir)
    cases = oof_cases(run, top, method, target_layer)
    checks = faithfulness_checks(run, method, target_layer, max_cases=max_check_cases)
    name = METHOD_NAMES[method]
    oof = run.summary.get("oof", {})
    intro = (f"{name} ({checks['target_layer']}) over out-of-fold cases of the run "
             f"{run.parent_run_id or run.folder}: the {top} most confident right and wrong cases per true class, each "
             f"explained by the fold model that did not train on it, for its predicted class. "
             + (f"Out-of-fold macro AUROC {oof['auroc_macro']:.3f}, accuracy {oof['accuracy']:.3f}." if "auroc_macro" in oof else ""))
    html_path = write_case_report(out / "report.html", f"Saliency report ({name})", cases, checks, intro, name)
    checks_path = out / "checks.json"
    checks_path.write_text(json.dumps(checks, indent=2, default=float) + "\n")
    return {"html": str(html_path), "checks_json": str(checks_path), "n_cases": len(cases), "checks": checks}


def report_metrics(checks: dict) -> dict[str, float]:
    """Flat MLflow metrics of the checks: randomization median rho, per-class localization."""
    metrics = {"saliency_randomization_median_rho": checks["randomization"]["median_rho"]}
    for name, v in checks.get("localization", {}).items():
        for key in ("pointing_hit_rate", "pointing_chance", "energy_in_lesion", "lesion_area"):
            metrics[f"saliency_{key}_{name}"] = v[key]
    return metrics


def report_after_training(out: Path, cfg, tracker, parent_run_id: str) -> dict:
    """The ``train`` stage's last step: the OOF saliency report in ``out/saliency`` and the parent
    MLflow run (artifacts ``saliency/``, metrics ``saliency_*``). The manifest is logged too
    (``ingest/manifest.csv``) so ``lung-effnet report --run <run id>`` can rebuild it from MLflow.
    A failure here is logged and recorded, not raised: the run's models and metrics are already saved."""
    import logging

    log = logging.getLogger(__name__)
    tracker.log_artifacts(parent_run_id, [Path(out) / "ingest" / "manifest.csv"], "ingest")
    if not cfg.report.enabled:
        return {"enabled": False}
    try:
        result = build_oof_report(Path(out), Path(out) / "saliency", cfg.report.method, cfg.report.top)
    except Exception as exc:  # noqa: BLE001 - the report must not lose a finished training run
        log.error("saliency report failed (%s: %s); rebuild it with `lung-effnet report --run %s`",
                  type(exc).__name__, exc, out)
        return {"enabled": True, "error": f"{type(exc).__name__}: {exc}"}
    tracker.log_artifacts(parent_run_id, [Path(result["html"]), Path(result["checks_json"])], "saliency")
    tracker.log_metrics(parent_run_id, report_metrics(result["checks"]))
    return {"enabled": True, "html": result["html"], "n_cases": result["n_cases"],
            "randomization_passed": result["checks"]["randomization"]["passed"]}

"""The saliency report of a finished ``train`` run: ``build_oof_report(run, out_dir)``.

The most confident right and wrong out-of-fold cases per true class, each explained by its own
fold's model (the one that never saw it) on inputs re-created exactly as training saw them (same
manifest, same preprocessing, same cache), with the faithfulness checks of ``explain.checks``,
rendered by ``explain.html``. ``report_after_training`` runs it at the end of ``train``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError
from lung_effnet.explain.html import Case, RunContext, fmt_percent, write_case_report
from lung_effnet.explain.trained_run import TrainedRun, load_run


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
    from lung_effnet.preprocess.cache import PlaneReader, default_cache_dir, load_or_preprocess

    cfg = run.config.data
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    reader = PlaneReader(run.manifest, cfg.context_slices)  # all rows: 2.5D neighbours come from the series
    by_key = {(r["path"], str(r.get("slice_index", ""))): r for r in run.manifest}
    images, masks = [], []
    for i in indices:
        key = (run.oof[i]["path"], str(run.oof[i].get("slice_index", "")))
        if key not in by_key:
            raise InputError(f"{key[0]} (slice {key[1]}): out-of-fold row not in the run's manifest")
        image, mask, _ = load_or_preprocess(by_key[key], reader, cfg, cache_dir)
        images.append(image.astype(np.float32))
        masks.append(mask[0] > 0)
    size = cfg.image_size
    if not images:
        return np.zeros((0, 2 * cfg.context_slices + 1, size, size), np.float32), np.zeros((0, size, size), bool)
    return np.stack(images), np.stack(masks)


def explain_oof(run: TrainedRun, indices: Sequence[int], images: np.ndarray, method: str = "gradcam",
                target_layer: str | None = None, classes: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(n, S, S)`` of OOF rows, each by its own fold's model for ``classes`` (default: its
    recorded predicted class), and that model's probabilities ``(n, 3)`` on the re-created inputs
    (to check them)."""
    import torch

    from lung_effnet.explain.gradcam import grad_cam, members_of

    members = members_of(run.predictor.model)
    folds = np.array([int(run.oof[i]["fold"]) for i in indices], dtype=np.int64)
    if classes is None:
        classes = run.probabilities()[list(indices)].argmax(1) if len(indices) else np.zeros(0, np.int64)
    classes = np.asarray(classes, dtype=np.int64)
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

    from lung_effnet.explain.checks import randomization_test
    from lung_effnet.explain.gradcam import explainer, members_of

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
    localization per true class on those with a lesion mask (maps for the true class, as the
    pointing game is defined: Zhang et al. 2016), the randomization test on ``n_randomization`` of
    them, and how exactly the recorded OOF probabilities were reproduced."""
    from lung_effnet.explain.checks import POINTING_MARGIN, localization, margin_px, randomization_summary

    rng = np.random.default_rng(seed)
    by_key = {(r["path"], str(r.get("slice_index", ""))): r for r in run.manifest}
    with_mask = [i for i, r in enumerate(run.oof) if by_key.get((r["path"], str(r.get("slice_index", ""))), {}).get("mask_path")]
    pool = with_mask or list(range(len(run.oof)))
    sample = sorted(rng.choice(pool, size=min(max_cases, len(pool)), replace=False).tolist()) if pool else []
    images, masks = oof_inputs(run, sample)
    labels = [CLASSES.index(run.oof[i]["label"]) for i in sample]
    maps, probs = explain_oof(run, sample, images, method, target_layer, classes=labels)
    rand_idx = sorted(rng.choice(len(sample), size=min(n_randomization, len(sample)), replace=False).tolist()) if sample else []
    rhos = _fold_randomization(run, [sample[j] for j in rand_idx], images[rand_idx], method, target_layer, seed) if rand_idx else []
    size = images.shape[-1] if len(images) else run.config.data.image_size
    grid = _feature_grid(run, size, target_layer)
    return {
        "method": method, "target_layer": _layer_name(run, target_layer), "n_cases": len(sample),
        "randomization": randomization_summary(np.array(rhos, dtype=float)) | {"rhos": rhos},
        "localization": localization(maps, masks, labels) if with_mask else {},
        "pointing_margin_px": margin_px((size, size), POINTING_MARGIN),
        "max_abs_probability_difference": float(np.abs(probs - run.probabilities()[sample]).max()) if sample else math.nan,
        "notes": [f"Maps come from a {grid} x {grid} feature grid upsampled to {size} x {size} px: they place "
                  f"evidence to within about {size // max(grid, 1)} px, coarser than small lesions.",
                  "Out-of-fold inputs re-created from the run's manifest and cache; the fold models reproduce the "
                  "recorded out-of-fold probabilities to within the max |difference| in checks.json."],
    }


def _layer_name(run: TrainedRun, target_layer: str | None) -> str:
    """The module the maps were read at (the members' default when ``target_layer`` is None)."""
    from lung_effnet.explain.gradcam import members_of, resolve_target_layer

    return resolve_target_layer(members_of(run.predictor.model)[0], target_layer)


def _feature_grid(run: TrainedRun, size: int, target_layer: str | None) -> int:
    """Side of the target layer's feature map for a ``size`` input (7 for b0 at 224 px)."""
    import torch

    from lung_effnet.explain.gradcam import members_of, resolve_target_layer

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
    from lung_effnet.explain.checks import energy_in_lesion, pointing_chance, pointing_hit

    if not mask.any():
        return {}
    return {"pointing game": f"{'hit' if pointing_hit(cam, mask) else 'miss'} "
                             f"(a random point would hit {fmt_percent(pointing_chance(mask))} of the time)",
            "energy in lesion": f"{fmt_percent(energy_in_lesion(cam, mask))} of the map "
                                f"(the lesion covers {fmt_percent(float(mask.mean()))} of the slice)"}


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
                     target_layer: str | None = None, max_check_cases: int = 200, summary: dict | None = None) -> dict:
    """Write ``out_dir/report.html`` and ``out_dir/checks.json`` for a finished run (a
    ``TrainedRun``, or what ``load_run`` accepts). ``summary``: the run's CV summary, whose out-of-fold
    AUROC heads the page (default ``run.summary``, ``cv_summary.json``; ``train`` passes its summary,
    the report being written before that file). Returns ``{"html", "checks_json", "n_cases", "checks"}``."""
    from lung_effnet.explain.gradcam import METHODS

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    run = run if isinstance(run, TrainedRun) else load_run(run)
    out = Path(out_dir)
    cases = oof_cases(run, top, method, target_layer)
    checks = faithfulness_checks(run, method, target_layer, max_cases=max_check_cases)
    name = METHOD_NAMES[method]
    summary = summary or run.summary
    context = RunContext.from_summary(summary, checks, source="not in the run's cv_summary.json" if summary
                                      else "the run has no cv_summary.json")
    intro = (f"{name} ({checks['target_layer']}) over out-of-fold cases of the run "
             f"{run.parent_run_id or run.folder}: the {top} most confident right and wrong cases per true class, each "
             f"explained by the fold model that did not train on it, for its predicted class.")
    html_path = write_case_report(out / "report.html", f"Saliency report ({name})", cases, checks, intro, name,
                                  context=context)
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


def report_after_training(out: Path, cfg, tracker, parent_run_id: str, summary: dict | None = None) -> dict:
    """The ``train`` stage's last step: the OOF saliency report in ``out/saliency`` and the parent
    MLflow run (artifacts ``saliency/``, metrics ``saliency_*``). ``summary``: the CV summary about to be
    written to ``cv_summary.json`` (its out-of-fold AUROC heads the report; without it, "not recorded"). The manifest is logged too
    (``ingest/manifest.csv``) so ``lung-effnet report --run <run id>`` can rebuild it from MLflow.
    A failure here is logged and recorded, not raised: the run's models and metrics are already saved."""
    import logging

    log = logging.getLogger(__name__)
    tracker.log_artifacts(parent_run_id, [Path(out) / "ingest" / "manifest.csv"], "ingest")
    if not cfg.report.enabled:
        return {"enabled": False}
    try:
        result = build_oof_report(Path(out), Path(out) / "saliency", cfg.report.method, cfg.report.top, summary=summary)
    except Exception as exc:  # noqa: BLE001 - the report must not lose a finished training run
        log.error("saliency report failed (%s: %s); rebuild it with `lung-effnet report --run %s`",
                  type(exc).__name__, exc, out)
        return {"enabled": True, "error": f"{type(exc).__name__}: {exc}"}
    tracker.log_artifacts(parent_run_id, [Path(result["html"]), Path(result["checks_json"])], "saliency")
    tracker.log_metrics(parent_run_id, report_metrics(result["checks"]))
    return {"enabled": True, "html": result["html"], "n_cases": result["n_cases"],
            "randomization_passed": result["checks"]["randomization"]["passed"]}

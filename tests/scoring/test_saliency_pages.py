"""``score --saliency`` pages: titled by the series' folder (UID in small print), research use only,
the model's out-of-fold AUROC and localization from its training run (or "not recorded"), probabilities
to significant digits, overlay colours over each map's own range."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pytest

from lung_effnet.classes import CLASSES
from lung_effnet.explain.html import Case, RunContext, case_png, map_range
from lung_effnet.scoring.saliency import model_context, write_series_report

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678901234567890123"
SUMMARY = {"oof": {"auroc_macro": 0.4712, "auroc_macro_ci95": [0.351, 0.598], "n": 382.0}, "n_patients": 60}
CHECKS = {"pointing_margin_px": 6.428571, "localization": {"malignant": {
    "n": 25, "pointing_hit_rate": 0.68, "pointing_chance": 0.0412, "energy_in_lesion": 0.121, "lesion_area": 0.0131}}}


def _text(page: str) -> str:
    """The page's visible text, tags and head removed, entities decoded, whitespace collapsed."""
    body = re.sub(r"<head>.*</head>|data:image/png;base64,[^'\"]+", "", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def _page(model_dir, tmp_path, context, path: str = "archive/study_a/CT chest 1.25mm") -> str:
    rng = np.random.default_rng(0)
    probs = np.array([[0.00026, 0.99948, 0.00026], [0.2, 0.7, 0.1]])
    item = {"path": path, "series_uid": UID, "predicted": "malignant",
            "probs": probs.mean(0).tolist(), "slices": [[k, f"archive/study_a/CT chest 1.25mm/{k}.dcm", *p, True]
                                                        for k, p in enumerate(probs)]}
    from lung_effnet.models.predictor import load_model

    model = load_model(model_dir).model
    name, _ = write_series_report(model, rng.random((2, 1, 32, 32), dtype=np.float32), [0, 1], probs, item, tmp_path,
                                  context=context)
    return (tmp_path / name).read_text()


def test_a_page_is_titled_by_its_folder_and_carries_the_training_runs_figures(tiny_model_dir, tmp_path):
    run = tmp_path / "train"
    shutil.copytree(tiny_model_dir, run / "model")  # train's layout: model/ beside cv_summary.json
    (run / "cv_summary.json").write_text(json.dumps(SUMMARY))
    (run / "saliency").mkdir()
    (run / "saliency" / "checks.json").write_text(json.dumps(CHECKS))
    context = model_context(run / "model")
    assert model_context(run) == context  # --model <out>/model or --model <out>
    page = _page(run / "model", tmp_path / "out", context)
    h1 = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert h1 == "archive/study_a/CT chest 1.25mm" and UID not in h1
    assert re.search(r"<p class='subtitle'>Series Instance UID " + re.escape(UID) + "</p>", page)  # the UID in small print
    text = _text(page)
    assert "Research use only, not for diagnosis." in text
    assert "out-of-fold macro AUROC in its training run's cross-validation: 0.47 (95% CI 0.35-0.60)" in text
    assert "does not exclude 0.5 (chance)" in text  # a model at chance is said to be one
    assert "the map's peak falls on the lesion (or within 6.4 px of it) in 68% of them; a random point would in 4.1%" in text
    assert "0.00026" in text and "0.000 " not in text and "6.429" not in text  # significant digits
    assert "lowest to its highest value" in text  # the colour scale is explained


def test_a_model_without_its_run_says_not_recorded(tiny_model_dir, tmp_path):
    context = model_context(tiny_model_dir)  # a model folder with no cv_summary.json beside it
    assert context.auroc_macro is None
    text = _text(_page(tiny_model_dir, tmp_path, context))
    assert "Research use only" in text and "AUROC in its training run's cross-validation: not recorded" in text
    assert "Where the run's maps fall on lesions: not recorded" in text
    assert "not recorded" in model_context("models:/lung-effnet@champion").auroc_text()
    (tmp_path / "cv_summary.json").write_text("{not json")
    damaged = tmp_path / "model"
    shutil.copytree(tiny_model_dir, damaged)
    assert "not readable" in model_context(damaged).auroc_text()  # a damaged summary does not stop scoring


def test_overlay_colours_span_the_maps_own_range(monkeypatch):
    from matplotlib.axes import Axes

    cam = np.linspace(0.2, 0.6, 32 * 32).reshape(32, 32)  # an ensemble's mean map rarely reaches 0 or 1
    assert map_range(cam) == pytest.approx((0.2, 0.6)) and map_range(np.zeros((4, 4))) == (0.0, 1.0)
    limits = []
    imshow = Axes.imshow

    def recording(self, data, *args, **kwargs):
        limits.append((kwargs.get("vmin"), kwargs.get("vmax"), kwargs.get("cmap")))
        return imshow(self, data, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording)
    case_png(Case(image=np.zeros((32, 32)), cam=cam, probs=[0.1, 0.8, 0.1], predicted=CLASSES[1]))
    assert (pytest.approx(0.2), pytest.approx(0.6), "jet") in limits


def test_a_series_directly_in_the_input_folder_is_not_titled_by_a_dot(tiny_model_dir, tmp_path):
    page = _page(tiny_model_dir, tmp_path, RunContext(source="test"), path=".")
    assert re.search(r"<h1>(.*?)</h1>", page).group(1) == "the --input folder itself"

"""Saliency reports: the HTML renderer, the report written after train, `lung-effnet report`."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest

from lung_effnet.classes import CLASSES
from lung_effnet.cli import main
from lung_effnet.explain.html import Case, RunContext, fmt_number, fmt_percent, fmt_probability, write_case_report
from lung_effnet.explain.oof_report import select_cases
from lung_effnet.explain.trained_run import load_run


@pytest.fixture(scope="module")
def tiny(saliency_run):
    return saliency_run


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_case_report_is_one_self_contained_file(tmp_path):
    rng = np.random.default_rng(0)
    cases = [Case(image=rng.random((32, 32)), cam=rng.random((32, 32)), probs=[0.1, 0.7, 0.2], predicted="malignant",
                  true_label=label, caption="<script>alert(1)</script>", group=label,
                  mask=np.pad(np.ones((4, 4)), 14) if label == "malignant" else None) for label in ("malignant", "normal")]
    page = write_case_report(tmp_path / "r.html", "Series <1>", cases).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page) and "<script>" not in page  # offline, escaped
    pngs = _images(page)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)
    assert page.count('class="wrong"') == 1 and page.count('class="right"') == 1
    assert "importance" not in page  # the colour bar label is inside the PNG, not text


def _text(page: str) -> str:
    """The page's visible text, tags and head removed, entities decoded, whitespace collapsed."""
    body = re.sub(r"<head>.*</head>|data:image/png;base64,[^'\"]+", "", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def test_numbers_are_written_to_significant_digits():
    assert [fmt_number(v) for v in (0.00026, 0.65625, 6.428571, 1200.4, 0.0, 3, float("nan"))] == [
        "0.00026", "0.656", "6.43", "1200", "0", "3", "n/a"]
    assert fmt_number(6.428571, 2) == "6.4" and fmt_percent(0.0412) == "4.1%" and fmt_percent(0.68) == "68%"
    assert [fmt_probability(p) for p in (0.00026, 0.99974, 0.5, 0.0123, 1.0)] == ["0.00026", "0.99974", "0.500", "0.012", "1"]


CHECKS = {"randomization": {"n": 16, "n_undefined": 0, "median_rho": 0.12, "mean_rho": 0.1, "max_rho": 0.4, "threshold": 0.5,
                            "passed": True},
          "localization": {"malignant": {"n": 25, "pointing_hit_rate": 0.68, "pointing_chance": 0.0412,
                                         "energy_in_lesion": 0.121, "lesion_area": 0.0131}},
          "pointing_margin_px": 6.428571, "notes": []}


def test_the_report_puts_the_checks_in_context_of_the_models_auroc(tmp_path):
    cases = [Case(image=np.zeros((32, 32)), cam=np.ones((32, 32)), probs=[0.00026, 0.99948, 0.00026], predicted="malignant")]
    at_chance = RunContext(auroc_macro=0.4712, auroc_ci95=(0.351, 0.598), n_cases=382, n_patients=60)
    text = _text(write_case_report(tmp_path / "r.html", "t", cases, CHECKS, context=at_chance).read_text())
    assert text.startswith(" t Research use only, not for diagnosis.")
    assert "macro AUROC in its training run's cross-validation: 0.47 (95% CI 0.35-0.60), over 382 slices of 60 patients" in text
    assert "does not exclude 0.5 (chance)" in text
    # the randomization test is worded as what it tests, beside the AUROC, never as a green "passed"
    assert "Model-parameter randomization test: the maps depend on the trained weights" in text
    assert "says nothing about whether the model is right (its out-of-fold macro AUROC: 0.47 (95% CI 0.35-0.60))" in text
    assert "passed" not in text and "class='pass'" not in (tmp_path / "r.html").read_text()
    assert ("On 25 malignant slices with a lesion mask, the map's peak falls on the lesion (or within 6.4 px of it) in 68% "
            "of them; a random point would in 4.1%. 12% of the map's weight lies in the lesion, which covers 1.3%") in text
    assert "0.00026" in text and "0.000 " not in text and "6.429" not in text
    failed = CHECKS | {"randomization": CHECKS["randomization"] | {"median_rho": 0.81, "passed": False}}
    text = _text(write_case_report(tmp_path / "f.html", "t", cases, failed).read_text())
    assert "the maps barely depend on the trained weights" in text and "Median Spearman rho 0.81 (not below 0.5)" in text
    assert "out-of-fold macro AUROC: not recorded" in text  # no context given: said, not left out


def test_train_writes_the_report_and_logs_it_to_the_parent_run(tiny):
    from mlflow.tracking import MlflowClient

    run_dir, summary = tiny["run"], tiny["summary"]
    assert summary["saliency_report"]["enabled"] and "error" not in summary["saliency_report"]
    page = (run_dir / "saliency" / "report.html").read_text()
    checks = json.loads((run_dir / "saliency" / "checks.json").read_text())
    assert len(_images(page)) == summary["saliency_report"]["n_cases"] >= 2
    assert "Model-parameter randomization test" in page and "pointing hit rate" in page
    oof = summary["oof"]
    text = _text(page)
    assert "Research use only, not for diagnosis." in text and "a random point would in" in text
    assert (f"out-of-fold macro AUROC in its training run's cross-validation: {oof['auroc_macro']:.2f} "
            f"(95% CI {oof['auroc_macro_ci95'][0]:.2f}-{oof['auroc_macro_ci95'][1]:.2f})") in text
    assert checks["localization"]["malignant"]["n"] >= 20 and "normal" not in checks["localization"]  # masks: malignant only
    assert checks["randomization"]["n"] == 16 and checks["max_abs_probability_difference"] < 1e-4  # OOF inputs reproduced
    client = MlflowClient(tracking_uri=tiny["uri"])
    parent = summary["mlflow"]["parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent, "saliency")} | {a.path for a in client.list_artifacts(parent, "ingest")}
    assert {"saliency/report.html", "saliency/checks.json", "ingest/manifest.csv"} <= artifacts
    metrics = client.get_run(parent).data.metrics
    assert metrics["saliency_randomization_median_rho"] == pytest.approx(checks["randomization"]["median_rho"])
    assert "saliency_pointing_hit_rate_malignant" in metrics


def test_cases_are_the_most_confident_right_and_wrong_per_class(tiny):
    run = load_run(tiny["run"])
    proba = run.probabilities()
    chosen = select_cases(run, top=2)
    for i, group in chosen:
        label = run.oof[i]["label"]
        right = CLASSES[proba[i].argmax()] == label
        assert group == f"true {label}: most confident {'right' if right else 'wrong'}"
        same = [j for j, r in enumerate(run.oof) if r["label"] == label and (CLASSES[proba[j].argmax()] == label) == right]
        assert proba[i].max() >= sorted(proba[same].max(1))[-min(2, len(same))] - 1e-12
    assert len(chosen) == sum(min(2, n) for n in _group_sizes(run, proba))


def _group_sizes(run, proba):
    labels = [r["label"] for r in run.oof]
    pred = [CLASSES[k] for k in proba.argmax(1)]
    return [sum(1 for a, b in zip(labels, pred) if a == c and (a == b) == right) for c in CLASSES for right in (True, False)]


def test_report_command_rebuilds_from_the_folder_and_from_the_mlflow_run_id(tiny, tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tiny["cache"]))
    assert main(["report", "--run", str(tiny["run"]), "--out", str(tmp_path / "a"), "--top", "1", "-q"]) == 0
    parent = tiny["summary"]["mlflow"]["parent_run_id"]
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the run's files are downloaded
    assert main(["report", "--run", parent, "--tracking-uri", tiny["uri"], "--out", str(tmp_path / "b"), "--top", "1",
                 "--method", "gradcampp"]) == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # the download (manifest paths, model) is gone
    assert "randomization test: median rho" in capsys.readouterr().out
    oof = tiny["summary"]["oof"]
    for name in ("a", "b"):
        assert (tmp_path / name / "report.html").stat().st_size > 10_000
        assert f"cross-validation: {oof['auroc_macro']:.2f} (95% CI" in _text((tmp_path / name / "report.html").read_text())
    assert json.loads((tmp_path / "b" / "checks.json").read_text())["method"] == "gradcampp"


def test_report_command_errors_are_one_line(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lung-effnet report: error:") and "not a finished train run" in err and "\n" not in err
    assert main(["report", "--run", "0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}",
                 "--out", str(tmp_path / "o")]) == 2
    assert "0123456789abcdef" in capsys.readouterr().err

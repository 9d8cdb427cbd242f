"""Tests for lung_effnet.training.metrics: metrics against scikit-learn, bootstrap by patient, calibration, plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

from lung_effnet.classes import CLASSES
from lung_effnet.training.metrics import (
    METRIC_NAMES,
    bootstrap_ci,
    classification_metrics,
    confusion,
    expected_calibration_error,
    metrics_for_weights,
    reliability_curve,
    summarize_folds,
)
from lung_effnet.training.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, save_figure


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def informative_case(n: int, seed: int = 0, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` and probabilities ``(n, 3)`` of a fair but imperfect classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    return y, softmax(logits)


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """Every metric here must stay quiet on the terminal, undefined cases included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- point metrics


def test_keys_are_exactly_the_contract():
    y, p = informative_case(60)
    expected = {"accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece", "n"}
    expected |= {f"{m}_{c}" for m in ("auroc", "sensitivity", "specificity") for c in CLASSES}
    expected |= {"auroc_benign_vs_malignant", "auroc_benign_vs_normal", "auroc_malignant_vs_normal"}
    m = classification_metrics(y, p)
    assert set(m) == expected == set(METRIC_NAMES)
    assert all(isinstance(v, float) for v in m.values())


def test_perfect_confident_predictions():
    y = np.array([0, 1, 2] * 20)
    p = np.eye(3)[y]
    m = classification_metrics(y, p)
    for name in METRIC_NAMES:
        expected = {"n": 60.0, "ece": 0.0}.get(name, 1.0)
        assert m[name] == pytest.approx(expected, abs=1e-12), name


def test_random_probabilities_give_chance_auroc():
    rng = np.random.default_rng(1234)
    y = np.repeat([0, 1, 2], 1000)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=y.size)
    m = classification_metrics(y, p)
    # SE of each AUROC here is ~0.011, so 0.05 is > 4 SE (and the seed is fixed anyway)
    for c in CLASSES:
        assert abs(m[f"auroc_{c}"] - 0.5) < 0.05
    assert abs(m["accuracy"] - 1 / 3) < 0.05


def test_metrics_equal_sklearn_on_a_random_case():
    y, p = informative_case(500, seed=7, signal=0.8)
    y_pred = p.argmax(axis=1)
    m = classification_metrics(y, p)
    per_class_auc = roc_auc_score(y, p, multi_class="ovr", average=None)
    assert [m[f"auroc_{c}"] for c in CLASSES] == pytest.approx(per_class_auc, abs=1e-12)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, y_pred, average="macro"))
    sensitivity = recall_score(y, y_pred, average=None)
    (tn, fp), _ = multilabel_confusion_matrix(y, y_pred).transpose(1, 2, 0)  # (2, 2, 3) -> rows
    for k, c in enumerate(CLASSES):
        assert m[f"sensitivity_{c}"] == pytest.approx(sensitivity[k])
        assert m[f"specificity_{c}"] == pytest.approx(tn[k] / (tn[k] + fp[k]))
    assert m["n"] == 500


def test_pairwise_aurocs_equal_sklearn_one_vs_one():
    y, p = informative_case(500, seed=11, signal=0.8)
    m = classification_metrics(y, p)
    pairs = [m["auroc_benign_vs_malignant"], m["auroc_benign_vs_normal"], m["auroc_malignant_vs_normal"]]
    # scikit-learn's one-vs-one macro AUROC is Hand & Till's: the mean of exactly these three
    assert np.mean(pairs) == pytest.approx(roc_auc_score(y, p, multi_class="ovo", average="macro"), abs=1e-12)
    bn = y != 1
    expected = (roc_auc_score(y[bn] == 0, p[bn, 0]) + roc_auc_score(y[bn] == 2, p[bn, 2])) / 2
    assert m["auroc_benign_vs_normal"] == pytest.approx(expected, abs=1e-12)


def test_pairwise_auroc_exposes_a_pair_the_one_vs_rest_auroc_hides():
    """Benign told from malignant perfectly and from normal not at all: one-vs-rest benign AUROC looks
    fair (about 0.75), the benign-normal pair is at chance."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 400)
    p = np.empty((y.size, 3))
    p[:, 1] = np.where(y == 1, rng.uniform(0.6, 0.9, y.size), rng.uniform(0.0, 0.1, y.size))
    share = rng.uniform(0.3, 0.7, y.size)  # benign vs normal: the same distribution for both classes
    p[:, 0] = (1 - p[:, 1]) * share
    p[:, 2] = (1 - p[:, 1]) * (1 - share)
    m = classification_metrics(y, p)
    assert 0.70 < m["auroc_benign"] < 0.80
    assert abs(m["auroc_benign_vs_normal"] - 0.5) < 0.05
    assert m["auroc_benign_vs_malignant"] == pytest.approx(1.0) and m["auroc_malignant_vs_normal"] == pytest.approx(1.0)


def test_missing_class_gives_nan_auroc_without_raising_or_warning():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]])
    m = classification_metrics(y, p)  # warnings are errors (fixture)
    assert math.isnan(m["auroc_normal"]) and math.isnan(m["sensitivity_normal"])
    assert math.isnan(m["auroc_benign_vs_normal"]) and math.isnan(m["auroc_malignant_vs_normal"])
    assert m["auroc_benign_vs_malignant"] == pytest.approx(
        (roc_auc_score(y == 0, p[:, 0]) + roc_auc_score(y == 1, p[:, 1])) / 2)
    assert m["auroc_benign"] == pytest.approx(roc_auc_score(y == 0, p[:, 0]))
    assert m["auroc_macro"] == pytest.approx((m["auroc_benign"] + m["auroc_malignant"]) / 2)
    assert m["specificity_normal"] == pytest.approx(4 / 6)  # two rows wrongly called normal
    assert all(math.isfinite(m[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece"))


def test_single_class_labels_are_all_quiet():
    y = np.zeros(5, dtype=int)
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    m = classification_metrics(y, p)
    assert all(math.isnan(m[f"auroc_{c}"]) for c in CLASSES) and math.isnan(m["auroc_macro"])
    assert m["accuracy"] == pytest.approx(0.6) and m["balanced_accuracy"] == pytest.approx(0.6)
    assert math.isnan(m["specificity_benign"])  # no negatives
    assert m["specificity_malignant"] == pytest.approx(0.8)
    # one class in the labels and in the predictions too: still quiet (warnings are errors here)
    m = classification_metrics(y, np.tile([0.8, 0.1, 0.1], (5, 1)))
    assert m["accuracy"] == 1.0 and math.isnan(m["auroc_benign_vs_normal"])


def test_sensitivity_specificity_by_hand():
    # true:      b  b  b  m  m  n  n  n
    # predicted: b  b  m  m  n  n  n  b
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = np.eye(3)[[0, 0, 1, 1, 2, 2, 2, 0]] * 0.7 + 0.1
    m = classification_metrics(y, p)
    # benign:    TP 2, FN 1, FP 1 (a normal), TN 4
    # malignant: TP 1, FN 1, FP 1 (a benign), TN 5
    # normal:    TP 2, FN 1, FP 1 (a malignant), TN 4
    assert m["sensitivity_benign"] == pytest.approx(2 / 3) and m["specificity_benign"] == pytest.approx(4 / 5)
    assert m["sensitivity_malignant"] == pytest.approx(1 / 2) and m["specificity_malignant"] == pytest.approx(5 / 6)
    assert m["sensitivity_normal"] == pytest.approx(2 / 3) and m["specificity_normal"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_confusion_keeps_absent_classes():
    cm = confusion([0, 0, 1], [0, 1, 1])
    assert cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_inputs_are_checked_with_clear_messages():
    y, p = informative_case(10)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        classification_metrics(y, p[:, :2])
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(y, p * 0.5)
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(y + 1, p)
    with pytest.raises(ValueError, match="rows"):
        classification_metrics(y[:5], p)


# ---------------------------------------------------------------- calibration


def test_ece_of_calibrated_and_overconfident_models():
    rng = np.random.default_rng(42)
    n = 20_000
    p = softmax(rng.normal(scale=1.5, size=(n, 3)))
    u = rng.random(n)[:, None]
    y = (u > np.cumsum(p, axis=1)).sum(axis=1)  # labels drawn from the model's own probabilities
    calibrated = expected_calibration_error(y, p)
    overconfident = expected_calibration_error(y, softmax(3 * np.log(p)))  # temperature 1/3
    assert calibrated < 0.02
    assert overconfident > 0.1 > 5 * calibrated
    assert classification_metrics(y, p)["ece"] == pytest.approx(calibrated)


def test_reliability_curve_matches_sklearn_calibration_curve():
    y, p = informative_case(800, seed=3)
    curve = reliability_curve(y, p, n_bins=15)
    correct, confidence = (p.argmax(axis=1) == y), p.max(axis=1)
    acc, conf = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    filled = curve["counts"] > 0
    np.testing.assert_allclose(curve["accuracy"][filled], acc)
    np.testing.assert_allclose(curve["confidence"][filled], conf)
    assert curve["counts"].sum() == 800 and np.isnan(curve["accuracy"][~filled]).all()
    assert curve["bin_centres"][0] == pytest.approx(1 / 30)
    ece = np.nansum(curve["counts"] / 800 * np.abs(curve["accuracy"] - curve["confidence"]))
    assert expected_calibration_error(y, p) == pytest.approx(ece)


# ---------------------------------------------------------------- weighted resamples and bootstrap


def test_metrics_for_weights_equal_sklearn_on_repeated_rows():
    y, p = informative_case(300, seed=5)
    p = np.round(p, 1)  # tied scores, the hard case for a rank AUROC
    p /= p.sum(axis=1, keepdims=True)
    weights = np.random.default_rng(0).poisson(1.0, size=(6, 300))
    weights[0, y == 2] = 0  # a resample without any normal row
    batch = metrics_for_weights(y, p, weights)
    for b in range(weights.shape[0]):
        rows = np.repeat(np.arange(300), weights[b])
        expected = classification_metrics(y[rows], p[rows])
        for name in METRIC_NAMES:
            np.testing.assert_allclose(batch[name][b], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert math.isnan(batch["auroc_normal"][0]) and math.isnan(batch["auroc_benign_vs_normal"][0])
    assert math.isfinite(batch["auroc_benign_vs_malignant"][0])


def patient_case(n_patients: int, rows_per_patient: int, seed: int = 0):
    """One distinct (label, proba) per patient, repeated ``rows_per_patient`` times."""
    y, p = informative_case(n_patients, seed=seed, signal=1.0)
    ids = np.array([f"P-{i:04d}" for i in range(n_patients)])
    return (np.repeat(y, rows_per_patient), np.repeat(p, rows_per_patient, axis=0),
            np.repeat(ids, rows_per_patient))


def width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


def test_bootstrap_resamples_patients_not_rows():
    one = bootstrap_ci(*patient_case(60, 1), n_boot=300, seed=3)
    many_y, many_p, many_ids = patient_case(60, 20)
    many = bootstrap_ci(many_y, many_p, many_ids, n_boot=300, seed=3)
    by_row = bootstrap_ci(many_y, many_p, None, n_boot=300, seed=3)
    for name in ("accuracy", "macro_f1", "auroc_malignant", "auroc_macro", "sensitivity_normal", "ece"):
        # 20 identical rows per patient carry no more information than one: same interval
        assert width(many[name]) == pytest.approx(width(one[name]), rel=1e-9), name
        # ... whereas resampling rows pretends they do (about 1/sqrt(20) as wide)
        assert width(by_row[name]) < 0.5 * width(many[name]), name


def test_unknown_patient_ids_are_their_own_groups():
    y, p = informative_case(120, seed=2)
    assert bootstrap_ci(y, p, [""] * 120, n_boot=50) == bootstrap_ci(y, p, None, n_boot=50)


def test_bootstrap_contains_point_estimate_and_is_reproducible():
    rng = np.random.default_rng(9)
    y, p = informative_case(600, seed=9)
    ids = np.array([f"P-{i}" for i in rng.integers(0, 150, 600)])  # 1..n rows per patient
    point = classification_metrics(y, p)
    ci = bootstrap_ci(y, p, ids, n_boot=400, seed=1)
    assert set(ci) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        low, high = ci[name]
        assert low <= point[name] <= high, (name, point[name], ci[name])
        assert width(ci[name]) > 0 or name == "n"
    assert bootstrap_ci(y, p, ids, n_boot=400, seed=1) == ci
    assert bootstrap_ci(y, p, ids, n_boot=400, seed=2) != ci


def test_bootstrap_metric_never_defined_gives_nan_pair():
    y, p = informative_case(90, seed=4)
    keep = y != 2
    ci = bootstrap_ci(y[keep], p[keep], np.arange(keep.sum()).astype(str), n_boot=100)
    assert all(math.isnan(v) for v in ci["auroc_normal"]) and all(math.isnan(v) for v in ci["sensitivity_normal"])
    assert all(math.isfinite(v) for v in ci["auroc_benign"])


# ---------------------------------------------------------------- folds and plots


def test_summarize_folds():
    folds = [{"accuracy": 0.8, "auroc_normal": float("nan")}, {"accuracy": 0.6, "auroc_normal": 0.9},
             {"accuracy": 0.7, "auroc_normal": 0.7}]
    s = summarize_folds(folds)
    assert s["accuracy_mean"] == pytest.approx(0.7) and s["accuracy_std"] == pytest.approx(0.1)
    assert s["auroc_normal_mean"] == pytest.approx(0.8)  # the NaN fold is left out
    assert set(s) == {"accuracy_mean", "accuracy_std", "auroc_normal_mean", "auroc_normal_std"}


def test_plots_write_png_files(tmp_path):
    y, p = informative_case(200, seed=11)
    keep = y != 1  # one class missing: the ROC plot must cope
    figures = {
        "cm.png": plot_confusion_matrix(confusion(y, p.argmax(axis=1)), title="fold 0"),
        "roc.png": plot_roc_curves(y, p),
        "roc_missing.png": plot_roc_curves(y[keep], p[keep]),
        "reliability.png": plot_reliability(y, p, n_bins=10),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / "plots" / name)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name

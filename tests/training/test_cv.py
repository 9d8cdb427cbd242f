"""The train stage end to end on tiny phantoms: outputs, folds, resume, MLflow, model loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lung_effnet
from lung_effnet.config import load_config
from lung_effnet.errors import RunExistsError, TrackingError
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.cv import run_cv
from tests.training.conftest import TINY


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_outputs_have_the_documented_shape(tiny_run, read_csv):
    out, summary, _ = tiny_run
    train = out / "train"
    on_disk = json.loads((train / "cv_summary.json").read_text())
    assert on_disk["oof"]["auroc_macro"] == pytest.approx(summary["oof"]["auroc_macro"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_benign", "auroc_malignant", "auroc_normal", "auroc_macro",
                "auroc_benign_vs_malignant", "auroc_benign_vs_normal", "auroc_malignant_vs_normal", "ece"):
        assert key in on_disk["oof"] and len(on_disk["oof"][f"{key}_ci95"]) == 2
        assert all(key in fold for fold in on_disk["folds"])
    assert len(on_disk["folds"]) == 3
    oof = read_csv(train / "oof_predictions.csv")
    assert list(oof[0])[:7] == ["path", "patient_id", "fold", "label", "p_benign", "p_malignant", "p_normal"]
    assert len(oof) == 9 * 4
    probs = np.array([[float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")] for r in oof])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    for name in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (train / "plots" / name).stat().st_size > 1000
    assert sorted(p.name for p in (train / "model").iterdir()) == ["config.yaml", "fold_0.pt", "fold_1.pt", "fold_2.pt",
                                                                   "model.json", "training_data.json"]
    assert len(json.loads((train / "model" / "training_data.json").read_text())["files"]) == 9  # one NIfTI a patient
    assert not list(train.glob("folds/*/last.pt")) and len(list(train.glob("folds/*/best.pt"))) == 3


def test_console_summary_names_each_pair_of_classes(tiny_run, capsys):
    from lung_effnet.console import print_cv_summary

    out, summary, _ = tiny_run
    print_cv_summary(summary, out / "train")
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("Pairwise AUROC"))
    oof = summary["oof"]
    low, high = oof["auroc_benign_vs_normal_ci95"]
    assert f"benign vs normal {oof['auroc_benign_vs_normal']:.3f} ({low:.2f}-{high:.2f})" in line
    assert "benign vs malignant" in line and "malignant vs normal" in line


def test_summary_counts_name_their_unit_and_series_and_patients_are_scored_as_score_does(tiny_run):
    from lung_effnet.classes import CLASSES
    from lung_effnet.scoring.aggregate import aggregate_series
    from lung_effnet.training.cv import aggregated

    summary = json.loads((tiny_run[0] / "train" / "cv_summary.json").read_text())
    assert (summary["n_slices"], summary["n_series"], summary["n_patients"]) == (36, 9, 9)  # a NIfTI volume is a series
    assert summary["oof"]["n_slices"] == 36 and summary["oof_series"]["n_series"] == 9
    assert summary["oof_patients"]["n_patients"] == 9 and summary["aggregation"]["top_k"] == 5
    assert all("n_slices" in f and "n" not in f for f in summary["folds"])
    for level in ("oof", "oof_series", "oof_patients"):
        assert "n" not in summary[level] and "n_ci95" not in summary[level]  # a count has no CI
        assert len(summary[level]["auroc_macro_ci95"]) == 2
    # the per-series rule is score's, and a series is as severe as its most severe slice
    y = np.array([CLASSES.index(c) for c in ("normal", "benign", "normal", "malignant", "normal")])
    p = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    keys = np.array(["a", "a", "b", "b", "b"])
    labels, probs, groups = aggregated(y, p, keys, np.array(["p1", "p1", "p2", "p2", "p2"]))
    assert [CLASSES[k] for k in labels] == ["benign", "malignant"] and groups.tolist() == ["p1", "p2"]
    np.testing.assert_allclose(probs[1], aggregate_series(p[2:]).probs)


def test_no_patient_in_two_folds(tiny_run, read_csv):
    out, _, _ = tiny_run
    folds_of = {}
    for row in read_csv(out / "train" / "oof_predictions.csv"):
        folds_of.setdefault(row["patient_id"], set()).add(row["fold"])
    assert len(folds_of) == 9 and all(len(f) == 1 for f in folds_of.values())
    table = read_csv(out / "train" / "folds.csv")
    assert sorted(r["patient_id"] for r in table) == sorted(folds_of)


def test_mlflow_holds_parent_and_nested_fold_runs(tiny_run):
    from mlflow.tracking import MlflowClient

    _, summary, uri = tiny_run
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = summary["mlflow"]["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 4 and len(children) == 3
    parent_run = client.get_run(parent)
    assert parent_run.data.params["train.epochs"] == "2"
    assert "oof_auroc_macro" in parent_run.data.metrics and "data_fingerprint" in parent_run.data.tags
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == [0, 1]
        assert "test_auroc_macro" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"cv_summary.json", "oof_predictions.csv", "folds.csv", "plots"} <= artifacts


def test_logged_model_loads_back_and_predicts_the_same(tiny_run):
    import mlflow

    out, summary, uri = tiny_run
    mlflow.set_tracking_uri(uri)
    local = lung_effnet.load_model(out / "train" / "model")
    logged = lung_effnet.load_model(summary["mlflow"]["model_uri"])
    x = local.preprocess([np.full((40, 40), -600.0, np.float32), np.linspace(-1000, 400, 1600, dtype=np.float32).reshape(40, 40)])
    assert tuple(x.shape) == (2, 1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    np.testing.assert_allclose(local.predict_proba(x), logged.predict_proba(x), atol=1e-6)
    assert local.predict_proba(x).shape == (2, 3)


def test_existing_run_needs_resume(tiny_run, tiny_data):
    out, _, uri = tiny_run
    with pytest.raises(RunExistsError, match="--resume"):
        run_cv(tiny_data, out / "train", load_config(None, TINY), labels_csv=tiny_data / "labels.csv", tracking_uri=uri)


def test_unreachable_server_fails_at_start(tiny_data, tmp_path):
    with pytest.raises(TrackingError, match="not reachable"):
        run_cv(tiny_data, tmp_path / "t", load_config(None, TINY), labels_csv=tiny_data / "labels.csv",
               tracking_uri="http://127.0.0.1:9")
    assert not (tmp_path / "t" / "ingest").exists()  # nothing was done before the check


def _train_cmd(data, out, uri, *extra):
    return [sys.executable, "-m", "lung_effnet.cli", "train", "-q", "--data", str(data), "--labels", str(data / "labels.csv"),
            "--out", str(out), "--tracking-uri", uri] + [a for o in TINY + ["train.epochs=4"] for a in ("--set", o)] + list(extra)


@pytest.mark.slow  # three CLI trainings: ~40 s on 2 cores (scoring's resume test stays in the default run)
def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path, cache_env):
    env = {**os.environ, "LUNG_EFFNET_CACHE_DIR": str(cache_env)}
    clean = subprocess.run(_train_cmd(tiny_data, tmp_path / "clean", f"sqlite:///{tmp_path / 'a.db'}"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]

    killed_out = tmp_path / "killed"
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    proc = subprocess.Popen(_train_cmd(tiny_data, killed_out, uri), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_out / "folds" / "fold_0" / "predictions.npy").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "cv_summary.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_train_cmd(tiny_data, killed_out, uri, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = json.loads((tmp_path / "clean" / "cv_summary.json").read_text())
    b = json.loads((killed_out / "cv_summary.json").read_text())
    assert a["oof"] == b["oof"] and a["folds"] == b["folds"]
    assert (tmp_path / "clean" / "oof_predictions.csv").read_text() == (killed_out / "oof_predictions.csv").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 4  # the resumed run continued the same parent and fold runs


def test_data_without_patient_ids_trains_with_a_recorded_warning(tmp_path, cache_env):
    from mlflow.tracking import MlflowClient

    data = write_synthetic_dataset(tmp_path / "iqoth", "jpg", n_patients=9, seed=1, size_px=48, n_slices=6, progress=False)
    for extra in ("manifest.csv", "synthetic.json"):
        (data / extra).unlink()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    summary = run_cv(data, tmp_path / "run", load_config(None, TINY), tracking_uri=uri, progress=False)
    assert any("NO PATIENT IDS" in w for w in summary["warnings"])
    assert summary["patient_ids"].startswith("missing")
    tags = MlflowClient(tracking_uri=uri).get_run(summary["mlflow"]["parent_run_id"]).data.tags
    assert tags["patient_ids"] == "missing" and "NO PATIENT IDS" in tags["warnings"]


@pytest.mark.slow  # two trainings through MLflow: ~40-90 s on 2 cores; the unit tests below cover the parts
def test_a_failed_run_ends_its_mlflow_runs_failed_and_resumes_from_another_directory(tiny_data, tmp_path, cache_env,
                                                                                      monkeypatch):
    """A crash marks the parent and the fold in progress FAILED (not RUNNING for ever); ``--resume`` from
    another working directory finds the same store (the default, relative ``sqlite:///mlflow.db``) and runs."""
    from mlflow.tracking import MlflowClient

    from lung_effnet.training import cv

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    out, labels = tmp_path / "run", tiny_data / "labels.csv"
    cfg = load_config(None, [*TINY, "cv.folds=2", "train.epochs=1", "report.enabled=false", "tracking.experiment=crash"])
    monkeypatch.chdir(tmp_path / "a")
    real = cv.predict_proba

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cv, "predict_proba", crash)  # after fold 0's training, before it is finished
    with pytest.raises(RuntimeError, match="disk full"):
        run_cv(tiny_data, out, cfg, labels_csv=labels, progress=False)
    uri = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("crash").experiment_id
    assert sorted(r.info.status for r in client.search_runs([experiment])) == ["FAILED", "FAILED"]  # parent, fold 0

    monkeypatch.setattr(cv, "predict_proba", real)
    monkeypatch.chdir(tmp_path / "b")
    summary = run_cv(tiny_data, out, cfg, labels_csv=labels, resume=True, progress=False)
    assert summary["mlflow"]["tracking_uri"] == uri and not (tmp_path / "b" / "mlflow.db").exists()
    runs = client.search_runs([experiment])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}


def test_runs_left_open_by_an_error_end_failed_and_by_ctrl_c_killed(tmp_path):
    from lung_effnet.tracking import CVTracker

    tracker = CVTracker(f"sqlite:///{tmp_path / 'k.db'}", "ended", tmp_path / "state.json")
    parent, fold = tracker.parent("p", {}, {}), tracker.fold(0)
    with pytest.raises(RuntimeError), tracker.ending_runs_on_error():
        raise RuntimeError("disk full")
    assert {tracker.client.get_run(r).info.status for r in (parent, fold)} == {"FAILED"}

    assert tracker.parent("p", {}, {}) == parent and tracker.fold(0) == fold  # --resume: running again
    tracker.finish(fold)
    current = tracker.fold(1)
    with pytest.raises(KeyboardInterrupt), tracker.ending_runs_on_error():
        raise KeyboardInterrupt
    statuses = {run_id: tracker.client.get_run(run_id).info.status for run_id in (parent, fold, current)}
    assert statuses == {parent: "KILLED", fold: "FINISHED", current: "KILLED"}


def test_a_run_remembers_its_store_so_resume_works_from_another_directory(tmp_path, monkeypatch):
    """The default store, ``sqlite:///mlflow.db``, is relative: the run records it absolute in its state file."""
    from lung_effnet.errors import InputError
    from lung_effnet.tracking import CVTracker, resolve_tracking_uri, run_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    state = tmp_path / "run" / "mlflow_run.json"
    state.parent.mkdir()
    monkeypatch.chdir(tmp_path / "a")
    parent = CVTracker(run_tracking_uri(state), "remembered", state).parent("p", {}, {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it: a new process has not
    monkeypatch.chdir(tmp_path / "b")
    uri = run_tracking_uri(state)
    assert uri == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}" != resolve_tracking_uri()
    assert CVTracker(uri, "remembered", state).parent("p", {}, {}) == parent
    with pytest.raises(InputError, match="is tracked in"):  # another store, asked for by name: refused
        run_tracking_uri(state, cli_uri="sqlite:///mlflow.db")


def test_unusable_pretrained_weights_stop_at_once_naming_the_key_and_the_file(tiny_data, tmp_path, capsys):
    from lung_effnet.cli import main

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00 not a checkpoint")
    code = main(["train", "-q", "--data", str(tiny_data), "--labels", str(tiny_data / "labels.csv"), "--out", str(tmp_path / "o"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'w.db'}", "--set", f"model.pretrained_weights={weights}"]
                + [a for o in TINY for a in ("--set", o)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"lung-effnet train: error: model.pretrained_weights: cannot read {weights} as a PyTorch state dict")
    assert not (tmp_path / "o" / "ingest").exists()  # stopped before any work

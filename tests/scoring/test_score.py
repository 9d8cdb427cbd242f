"""The score stage on a mixed phantom archive: rows, error rows, ledger, training-equal preprocessing,
workers, resume after SIGKILL, MLflow URIs, saliency pages and PHI canaries."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.cli import main
from lung_effnet.io.dicom_index import list_files
from lung_effnet.scoring import TOP_K, OutputMismatchError, aggregate_series, score_archive
from lung_effnet.scoring.journal import Journal
from lung_effnet.synthetic.dataset import write_synthetic_dataset

CANARIES = {
    "PatientName": "CANARY^SCORENAME^QX",
    "PatientID": "CANARY-SCORE-ID-5521",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "CANARYSCOREACC7",
    "InstitutionName": "Canary Scoring Hospital Qx",
}
OUTPUTS = ("predictions.csv", "slice_scores.csv", "files.csv", "errors.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """The tiny ensemble of ``tiny_model_dir`` (``tests/conftest.py``), also logged and registered in a
    local MLflow store the way ``train`` does it (``log_model_dir``).
    Returns ``(model_dir, tracking_uri, logged model URI)``.
    """
    import mlflow

    from lung_effnet.tracking import local_artifact_location, log_model_dir

    root = tmp_path_factory.mktemp("model")
    model_dir = tiny_model_dir
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("score-tiny", artifact_location=local_artifact_location(uri))
    with mlflow.start_run(experiment_id=experiment):
        model_uri = log_model_dir(model_dir, register_as="score-tiny", alias="candidate")
    return model_dir, uri, model_uri


@pytest.fixture(scope="module")
def archive(tmp_path_factory, read_csv):
    """Mixed archive: 3 plain DICOM series (localizers, an SR), 2 JPEG 2000 series (one in a folder it
    shares with another series), a truncated slice, a NIfTI volume and its mask, a JPG, a broken
    JPG and a text file. PHI canaries in every DICOM file. Returns (root, expected facts)."""
    tmp = tmp_path_factory.mktemp("sources")
    plain = write_synthetic_dataset(tmp / "plain", "dicom", n_patients=3, seed=1, size_px=48, n_slices=6, extras=True,
                                    phi=CANARIES, progress=False)
    packed = write_synthetic_dataset(tmp / "packed", "dicom", n_patients=2, seed=2, size_px=48, n_slices=5,
                                     compression="jpeg2000", phi=CANARIES, progress=False)
    nifti = write_synthetic_dataset(tmp / "nifti", "nifti", n_patients=1, seed=3, size_px=48, n_slices=4, progress=False)
    jpg = write_synthetic_dataset(tmp / "jpg", "jpg", n_patients=1, seed=4, size_px=48, n_slices=4, progress=False)
    root = tmp_path_factory.mktemp("archive") / "in"
    for name in ("P0001", "P0002", "P0003"):
        shutil.copytree(plain / name, root / "study_a" / name)
    shutil.copytree(packed / "P0001", root / "compressed")
    for f in (packed / "P0002").iterdir():  # a second series in a folder: grouped by UID, not folder
        shutil.copy(f, root / "study_a" / "P0001" / f"b_{f.name}")
    truncated = sorted((root / "study_a" / "P0002").iterdir())[2]
    truncated.write_bytes(truncated.read_bytes()[:-600])
    (root / "vol").mkdir()
    shutil.copy(nifti / "P0001" / "ct.nii.gz", root / "vol" / "ct.nii.gz")
    shutil.copy(nifti / "masks" / "P0001.nii.gz", root / "vol" / "lesion_mask.nii.gz")
    (root / "img").mkdir()
    shutil.copy(next((jpg / "Malignant cases").glob("*.jpg"), None) or next(jpg.rglob("*.jpg")), root / "img" / "slice.jpg")
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("reading notes\n")
    uids = {r["series_uid"] for d in (plain, packed) for r in read_csv(d / "labels.csv")}
    return root, {"uids": uids, "truncated": truncated.relative_to(root).as_posix()}


def _run_cli(args):
    """Run the CLI in this process with one torch thread, as the killed subprocess below runs:
    CPU convolutions may round differently with another thread count (1e-6 here), and "the same
    command" on the same machine always runs with the same count."""
    out, err = io.StringIO(), io.StringIO()
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().removeHandler(handler)
    return code, out.getvalue() + err.getvalue() + log.getvalue()


@pytest.fixture(scope="module")
def clean_run(trained, archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0]), "--out", str(out),
                              "--workers", "0", "--batch-size", "4"])
    assert code == 0, printed
    return out, printed


def test_every_series_volume_and_image_gets_one_row(clean_run, archive, read_csv):
    out, _ = clean_run
    _, facts = archive
    rows = read_csv(out / "predictions.csv")
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    dicom = [r for r in rows if r["kind"] == "dicom"]
    assert {r["series_uid"] for r in dicom} == facts["uids"] and len(dicom) == 5
    by_uid_folder = {r["path"] for r in dicom}
    assert by_uid_folder == {"study_a/P0001", "study_a/P0002", "study_a/P0003", "compressed"}
    assert sum(r["path"] == "study_a/P0001" for r in dicom) == 2  # two series in one folder
    n_slices = sorted(int(r["n_slices"]) for r in dicom)
    assert n_slices == [5, 5, 5, 6, 6]  # two 5-slice series, and a 6-slice one that lost its truncated slice
    damaged = next(r for r in dicom if r["path"] == "study_a/P0002")
    assert damaged["status"] == "incomplete" and "failed to decode" in damaged["warnings"]
    assert [(r["kind"], r["path"], r["n_slices"]) for r in rows if r["kind"] != "dicom"] == [
        ("images", "img/slice.jpg", "1"), ("nifti", "vol/ct.nii.gz", "4")]
    for r in rows:
        p = np.array([float(r[f"p_{c}"]) for c in CLASSES])
        assert abs(p.sum() - 1) < 1e-5 and r["predicted"] == CLASSES[int(np.argmax(p))]


def test_series_result_follows_the_documented_rule(clean_run, read_csv):
    out, _ = clean_run
    slices = read_csv(out / "slice_scores.csv")
    for row in read_csv(out / "predictions.csv"):
        own = [s for s in slices if s["series_uid"] == row["series_uid"]]
        assert [int(s["slice_index"]) for s in own] == list(range(int(row["n_slices"])))
        probs = np.array([[float(s[f"p_{c}"]) for c in CLASSES] for s in own])
        abnormal = np.array([float(s["abnormality"]) for s in own])
        np.testing.assert_allclose(abnormal, 1 - probs[:, 2], atol=2e-6)
        top = np.array([s["in_top_k"] == "1" for s in own])
        assert top.sum() == min(TOP_K, len(own))
        # The CSV rounds to 6 decimals, so the rule is checked up to ties at that precision.
        assert abnormal[top].min() >= abnormal[~top].max(initial=0) - 2e-6
        np.testing.assert_allclose([float(row[f"p_{c}"]) for c in CLASSES], probs[top].mean(0), atol=2e-6)
        key = int(row["key_slice"])
        assert top[key] and abnormal[key] >= abnormal.max() - 2e-6 and row["key_file"] == own[key]["file"]


def test_files_ledger_and_errors_account_for_every_input(clean_run, archive, read_csv):
    out, _ = clean_run
    root, facts = archive
    ledger = {r["path"]: r for r in read_csv(out / "files.csv")}
    assert sorted(ledger) == sorted(p.relative_to(root).as_posix() for p in list_files(root))
    scored = {s["file"] for s in read_csv(out / "slice_scores.csv")}
    assert {p for p, r in ledger.items() if r["status"] == "used"} == scored  # used = scored, nothing else
    errors = {r["path"]: r for r in read_csv(out / "errors.csv")}
    assert set(errors) == {p for p, r in ledger.items() if r["status"] != "used"}
    reasons = {p: (ledger[p]["status"], e["stage"], e["reason"]) for p, e in errors.items()}
    assert reasons[facts["truncated"]][:2] == ("failed", "decode")
    assert reasons["vol/lesion_mask.nii.gz"][0] == "skipped" and "not a CT volume" in reasons["vol/lesion_mask.nii.gz"][2]
    assert reasons["img/broken.jpg"][:2] == ("failed", "decode")
    assert reasons["notes.txt"][0] == "skipped"
    kinds = sorted(r[2].split(" (")[0].split(":")[0] for p, r in reasons.items() if p.startswith("study_a"))
    assert kinds == ["SR", "localizer", "localizer", "pixel data not decodable"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["files"] == {"total": len(ledger), "used": len(scored), "skipped": 5, "failed": 2}
    assert summary["counts"]["series_scored"] == 7 and summary["counts"]["series_skipped"] == 1
    assert summary["counts"]["series_failed"] == 1  # the broken JPG
    assert summary["run"]["slices_scored"] == len(scored) + 3  # the volume's 4 slices come from one file


def test_slices_are_preprocessed_as_in_training(clean_run, archive, trained, read_csv):
    """The tensors scored are bit-identical to those training builds (``PlaneReader`` +
    ``load_or_preprocess``, float16 as cached), and slice_scores.csv holds the model's output on them."""
    import lung_effnet
    from lung_effnet.preprocess.cache import PlaneReader, load_or_preprocess
    from lung_effnet.scoring.discover import discover
    from lung_effnet.scoring.prepare import finish_unit, prepare_unit
    from lung_effnet.scoring.runner import SliceScorer

    out, _ = clean_run
    root, _ = archive
    predictor = lung_effnet.load_model(trained[0])
    cfg = predictor.config.data
    units = {u.files[0] if u.kind == "nifti" else u.files[0].split("/")[0]: u for u in discover(root, progress=False).units}
    for folder in ("vol/ct.nii.gz", "compressed"):
        prepared = prepare_unit(units[folder], cfg)
        images = finish_unit(prepared, cfg, "cpu").numpy()  # the scoring process's side, on the CPU
        (item,) = prepared.items
        if folder.endswith(".nii.gz"):
            rows = [{"path": str(root / "vol" / "ct.nii.gz"), "slice_index": k} for k in range(4)]
        else:  # training reads each DICOM slice file on its own
            rows = [{"path": str(root / f), "slice_index": ""} for f in item.slice_files]
        reader = PlaneReader(rows, cfg.context_slices)
        expected = np.stack([load_or_preprocess(r, reader, cfg, out.parent / "train-cache")[0] for r in rows])
        assert images.dtype == np.float16 and np.array_equal(images, expected), folder
    probs = SliceScorer(predictor, 4)(expected)
    own = [s for s in read_csv(out / "slice_scores.csv") if s["path"] == "compressed"]
    # float32 rounding only: the run scored these slices in batches of another composition (measured up to 5e-6)
    np.testing.assert_allclose([[float(s[f"p_{c}"]) for c in CLASSES] for s in own], probs, atol=2e-5)
    assert np.ptp(probs[:, 0]) > 0.01  # the model tells these slices apart: the comparison has teeth


def _score_args(model, root, out, workers=0):
    return ["score", "-q", "--model", str(model), "--input", str(root), "--out", str(out), "--workers", str(workers),
            "--batch-size", "4"]


def test_killed_run_resumes_to_the_same_files(clean_run, archive, trained, tmp_path):
    """SIGKILL mid-run, then the same command again (in this process, and with decode workers,
    which must not change a result either) ends with the files of the clean run."""
    out, _ = clean_run
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lung_effnet.cli", *_score_args(trained[0], archive[0], killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in (killed / "parts").glob("*.json") if p.name != "run.json"]) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "predictions.csv").exists(), "the run finished before it could be killed"
    code, printed = _run_cli(_score_args(trained[0], archive[0], killed, workers=2))
    assert code == 0, printed
    for name in OUTPUTS:
        assert (killed / name).read_text() == (out / name).read_text(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, killed))
    assert a["counts"] == b["counts"]
    assert b["run"]["units_resumed"] >= 2 and b["run"]["units_scored"] >= 1 and b["run"]["workers"] == 2
    assert not any(v in printed for v in CANARIES.values())


def test_mlflow_model_uri_scores_like_the_model_folder(clean_run, archive, trained, tmp_path, monkeypatch, read_csv):
    out, _ = clean_run
    _, uri, model_uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    expected = {r["path"]: r for r in read_csv(out / "predictions.csv")}
    assert model_uri.startswith("models:/")
    for i, source in enumerate(("models:/score-tiny@candidate", model_uri)):
        score_archive(source, archive[0] / "vol", tmp_path / str(i), workers=0, batch_size=4, progress=False)
        (row,) = read_csv(tmp_path / str(i) / "predictions.csv")
        assert row["path"] == "ct.nii.gz"
        for c in CLASSES:
            assert abs(float(row[f"p_{c}"]) - float(expected["vol/ct.nii.gz"][f"p_{c}"])) < 1e-5  # thread counts may differ


def test_no_phi_in_outputs_or_printed_lines(clean_run):
    out, printed = clean_run
    texts = [printed] + [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    assert "Files:" in printed  # the summary was printed, and is checked too
    for value in CANARIES.values():
        for part in {value, value.split("^")[0]}:
            assert not any(part in t for t in texts), f"{part} leaked"


def test_saliency_writes_one_page_per_series(archive, trained, tmp_path, read_csv):
    out = tmp_path / "sal"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0] / "study_a"), "--out",
                              str(out), "--workers", "0", "--batch-size", "4", "--saliency"])
    assert code == 0, printed
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 4
    pages = sorted(p.relative_to(out).as_posix() for p in (out / "reports").glob("*.html"))
    assert sorted(r["report"] for r in rows) == pages and len(pages) == len(rows)
    page = (out / rows[0]["report"]).read_text()
    assert page.count("data:image/png;base64,") == min(TOP_K, int(rows[0]["n_slices"]))  # one per key slice
    for p in pages:
        assert not any(v.split("^")[0] in (out / p).read_text() for v in CANARIES.values())


def test_aggregation_follows_the_few_abnormal_slices():
    normal = np.tile([0.05, 0.05, 0.90], (40, 1))
    probs = normal.copy()
    probs[[17, 18, 19]] = [[0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.2, 0.7, 0.1]]
    score = aggregate_series(probs)
    assert score.predicted == "malignant" and score.key_slice == 17  # 17 and 19 tie on abnormality: lower index
    assert list(score.top) == [17, 19, 18, 0, 1]
    np.testing.assert_allclose(score.probs, probs[[17, 19, 18, 0, 1]].mean(0))
    assert aggregate_series(normal).predicted == "normal"  # the most suspicious slices of a normal series
    assert aggregate_series(probs[:1]).key_slice == 0
    with pytest.raises(ValueError, match="slice probabilities"):
        aggregate_series(np.zeros((0, 3)))


def test_an_out_folder_of_another_model_is_refused(tmp_path):
    Journal(tmp_path, {"model": "a", "top_k": 5})
    Journal(tmp_path, {"model": "a", "top_k": 5})  # the same settings resume
    with pytest.raises(OutputMismatchError, match="model"):
        Journal(tmp_path, {"model": "b", "top_k": 5})


def test_bad_inputs_stop_with_one_line(trained, tmp_path):
    code, printed = _run_cli(["score", "--model", str(trained[0]), "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--input: not found" in printed and printed.count("\n") == 1
    (tmp_path / "in").mkdir()
    code, printed = _run_cli(["score", "--model", str(tmp_path / "nomodel"), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--model: not found" in printed and printed.count("\n") == 1
    code, printed = _run_cli(["score", "--model", str(tmp_path / "in"), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a model directory" in printed


def test_quiet_hides_mlflow_download_bars(clean_run, archive, trained, tmp_path, monkeypatch, capsys):
    """``-q`` means no progress bars, MLflow's "Downloading artifacts" bar for a model URI included
    (it showed before); without ``-q`` that bar is there, so this test can tell."""
    from lung_effnet import cli

    _, uri, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # restored after the test
    shown = {}
    for flag in ("", "-q"):
        argv = ["score", "--model", "models:/score-tiny@candidate", "--input", str(archive[0] / "vol"),
                "--out", str(tmp_path / f"out{flag}"), "--workers", "0"]
        assert cli.main(argv + ([flag] if flag else [])) == 0
        shown[flag] = "Downloading artifacts" in capsys.readouterr().err
    assert shown == {"": True, "-q": False}

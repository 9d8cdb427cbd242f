"""``score --dicom-out``: a TID 1500 SR (and with ``--saliency`` a Grad-CAM Secondary Capture) per
scored DICOM series, filed in the source study, read back through highdicom, checked by
``dciodvfy`` (dicom3tools, a validator no one here wrote), and the only outputs with patient tags."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

from lung_effnet.classes import CLASSES
from lung_effnet.scoring.dicom_results import NOT_DICOM, SC_FILE, SR_FILE
from tests.scoring.test_score import CANARIES, _run_cli, archive, trained  # noqa: F401 - fixtures

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def dicom_run(trained, archive, tmp_path_factory):  # noqa: F811 - fixtures imported above
    """The whole mixed archive scored with ``--saliency --dicom-out``."""
    base = tmp_path_factory.mktemp("dicom-out")
    out, dicom = base / "out", base / "pacs"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0]), "--out", str(out),
                              "--workers", "0", "--batch-size", "4", "--saliency", "--dicom-out", str(dicom)])
    assert code == 0, printed
    return out, dicom, printed


def _dicom_rows(out: Path, read_csv) -> list[dict]:
    return [r for r in read_csv(out / "predictions.csv") if r["kind"] == "dicom"]


def test_one_sr_and_one_sc_per_scored_dicom_series(dicom_run, read_csv):
    out, dicom, printed = dicom_run
    rows = _dicom_rows(out, read_csv)
    assert len(rows) == 5  # 3 plain + 2 JPEG 2000 series
    summary = json.loads((out / "summary.json").read_text())["dicom_out"]
    assert summary["series_written"] == len(rows) and summary["files_written"] == 2 * len(rows)
    # the NIfTI volume and the JPG are scored but have no study to file a result in: said, with the reason
    assert sorted((n["reason"], n["series"]) for n in summary["not_written"]) == sorted(
        [(NOT_DICOM["nifti"], 1), (NOT_DICOM["images"], 1)])
    folders = sorted(p.name for p in dicom.iterdir())
    assert len(folders) == len(rows)
    for folder in folders:
        assert sorted(p.name for p in (dicom / folder).iterdir()) == [SC_FILE, SR_FILE]
    assert f"{2 * len(rows)} file(s) for {len(rows)} series" in printed


def _read_back(path: Path):
    import highdicom as hd

    sr = hd.sr.srread(path)
    group = sr.content.get_image_measurement_groups()[0]
    probs = {m.name.value.removeprefix("p-"): m.value for m in group.get_measurements()}
    finding = group.get_qualitative_evaluations()[0].value.meaning.lower()
    return sr, group, probs, finding


def test_sr_reads_back_with_the_scored_class_probabilities_and_key_slice(dicom_run, archive, read_csv):  # noqa: F811
    out, dicom, _ = dicom_run
    for row in _dicom_rows(out, read_csv):
        folder = next(p for p in dicom.iterdir() if p.name.startswith(row["series_uid"][:40]))
        sr, group, probs, finding = _read_back(folder / SR_FILE)
        assert finding == row["predicted"]
        for c in CLASSES:
            assert abs(probs[c] - float(row[f"p_{c}"])) < 1e-6
        key = pydicom.dcmread(archive[0] / row["key_file"], stop_before_pixels=True)
        # filed in the source study, as a new series, with the patient copied for the PACS
        assert sr.StudyInstanceUID == key.StudyInstanceUID and sr.SeriesInstanceUID != key.SeriesInstanceUID
        assert sr.PatientID == key.PatientID and sr.PatientName == key.PatientName
        assert [s.referenced_sop_instance_uid for s in group.source_images] == [key.SOPInstanceUID]
        # the aggregation rule and the model are the algorithm identification
        texts = {code.meaning: [i.value for i in find_content_items(group[0], name=code, recursive=True)]
                 for code in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)}
        assert texts["Algorithm Name"] and texts["Algorithm Name"][0].startswith("lung-effnet")
        assert any(p.startswith("aggregation: mean class probabilities of the top_k") for p in texts["Algorithm Parameters"])
        sc = pydicom.dcmread(folder / SC_FILE)
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert "not for diagnosis" in sc.SeriesDescription and sc.SeriesInstanceUID == sr.SeriesInstanceUID
        assert sc.StudyInstanceUID == key.StudyInstanceUID
        assert sc.pixel_array.shape[2] == 3 and sc.pixel_array.std() > 0
        # the SR lists the overlay in its image library
        library = str(sr.content)
        assert sc.SOPInstanceUID in library


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) not installed: "
                                             "apt-get install dicom3tools; .ci/run installs it")
def test_every_written_object_passes_dciodvfy(dicom_run):
    _, dicom, _ = dicom_run
    files = sorted(dicom.rglob("*.dcm"))
    assert files
    for f in files:
        result = subprocess.run([DCIODVFY, str(f)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{f.relative_to(dicom)}:\n" + "\n".join(errors)


def test_dciodvfy_finds_errors_when_there_are_some(dicom_run, tmp_path):
    """The check above can fail: a written SR without its (Type 1) Completion Flag is reported."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    _, dicom, _ = dicom_run
    ds = pydicom.dcmread(next(dicom.rglob(SR_FILE)))
    del ds.CompletionFlag
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = subprocess.run([DCIODVFY, str(broken)], capture_output=True, text=True, timeout=60)
    assert any(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())


def test_patient_tags_only_under_dicom_out(dicom_run):
    out, dicom, printed = dicom_run
    texts = [printed] + [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    for value in CANARIES.values():
        for part in {value, value.split("^")[0]}:
            assert not any(part in t for t in texts), f"{part} leaked outside --dicom-out"
    # ...and the DICOM results do carry them: a PACS files the result with the patient's images
    sr = pydicom.dcmread(next(dicom.rglob(SR_FILE)))
    assert str(sr.PatientName) == CANARIES["PatientName"] and sr.PatientID == CANARIES["PatientID"]


def test_a_repeated_run_writes_the_same_instances(dicom_run, trained, archive, tmp_path):  # noqa: F811
    """UIDs are derived from the source series, the model and the content: scoring one study again
    into another folder gives the same SR / SC instance UIDs (a PACS updates, does not duplicate)."""
    _, dicom, _ = dicom_run
    again = tmp_path / "pacs"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0] / "compressed"),
                              "--out", str(tmp_path / "out"), "--workers", "0", "--batch-size", "4", "--saliency",
                              "--dicom-out", str(again)])
    assert code == 0, printed
    (folder,) = list(again.iterdir())
    for name in (SR_FILE, SC_FILE):
        a, b = pydicom.dcmread(folder / name), pydicom.dcmread(dicom / folder.name / name)
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_without_saliency_only_the_sr(trained, archive, tmp_path):  # noqa: F811
    pacs = tmp_path / "pacs"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0] / "compressed"),
                              "--out", str(tmp_path / "out"), "--workers", "0", "--dicom-out", str(pacs)])
    assert code == 0, printed
    (folder,) = list(pacs.iterdir())
    assert [p.name for p in folder.iterdir()] == [SR_FILE]
    _, _, probs, _ = _read_back(folder / SR_FILE)
    assert abs(sum(probs.values()) - 1) < 1e-5


@pytest.mark.parametrize("where", ["out", "input"])
def test_dicom_out_overlapping_other_outputs_is_refused(trained, archive, tmp_path, where):  # noqa: F811
    out = tmp_path / "out"
    inside = out / "pacs" if where == "out" else archive[0] / "pacs"
    code, printed = _run_cli(["score", "-q", "--model", str(trained[0]), "--input", str(archive[0]), "--out", str(out),
                              "--workers", "0", "--dicom-out", str(inside)])
    assert code == 2 and "--dicom-out" in printed and "patient tags" in printed
    assert not inside.exists()


def test_dicom_out_is_checked_before_any_work_whatever_runs_the_scoring(trained, archive, tmp_path):  # noqa: F811
    """Inside --out through the shard executor (whose jobs write to --out/shards/...), or a folder that
    cannot be written: one line, exit 2, nothing scored."""
    out = tmp_path / "out"
    base = ["score", "-q", "--model", str(trained[0]), "--input", str(archive[0]), "--out", str(out), "--workers", "0"]
    code, printed = _run_cli(base + ["--executor", "local", "--shards", "2", "--dicom-out", str(out / "pacs")])
    assert code == 2 and "--dicom-out" in printed and "patient tags" in printed and printed.count("\n") == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, printed = _run_cli(base + ["--dicom-out", str(blocker / "pacs")])
    assert code == 2 and "--dicom-out: not a folder" in printed and printed.count("\n") == 1
    assert not (out / "predictions.csv").exists() and not (out / "shards").exists()

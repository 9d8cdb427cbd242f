"""Ingest of a whole synthetic archive: every file accounted for, masks attached, no PHI out."""

from __future__ import annotations

import logging

import pytest

from lung_effnet.cli import main
from lung_effnet.io.dicom_index import list_files
from lung_effnet.synthetic.dataset import write_synthetic_dataset

CANARIES = {
    "PatientName": "CANARY^NAME^ZQX",
    "PatientID": "CANARY-ID-7731",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARYACC99",
    "InstitutionName": "Canary Institute Zqx",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    # The canaries give every series one PatientID, so all are one patient: one class keeps it valid.
    data = write_synthetic_dataset(root / "data", "dicom", n_patients=4, seed=1, size_px=48, n_slices=6,
                                   extras=True, phi=CANARIES, class_fractions={"malignant": 1.0}, progress=False)
    return data


def test_ingest_cli_accounts_for_every_file_and_leaks_no_phi(archive, tmp_path, capsys, caplog, read_csv):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    code = main(["ingest", "-q", str(archive), "--out", str(out), "--labels", str(archive / "labels.csv"), "--nifti"])
    assert code == 0
    printed = capsys.readouterr()
    ledger = read_csv(out / "files.csv")
    assert len(ledger) == len(list_files(archive))
    statuses = {r["path"]: r["status"] for r in ledger}
    assert statuses["labels.csv"] == "used"
    assert all(statuses[p] == "used" for p in statuses if p.startswith("masks/"))
    skipped = [r for r in ledger if r["status"] == "skipped"]
    assert any("localizer" in r["reason"] for r in skipped) and any("SR" in r["reason"] for r in skipped)
    errors = read_csv(out / "errors.csv")
    assert {r["path"] for r in errors} == {r["path"] for r in ledger if r["status"] != "used"}

    manifest = read_csv(out / "manifest.csv")
    assert len(manifest) == 4 * 6 and all(r["mask_path"] for r in manifest)
    assert len({r["patient_id"] for r in manifest}) == 1
    series = read_csv(out / "series.csv")
    assert len(series) == 4 and all(r["status"] == "ok" and r["nifti_path"] for r in series)

    texts = [printed.out, printed.err, caplog.text]
    texts += [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    for value in CANARIES.values():
        for text in texts:
            assert value not in text, f"{value} leaked"
        assert value.split("^")[0] not in "".join(texts)
    assert "Samples" in printed.out and "malignant" in printed.out  # the summary table

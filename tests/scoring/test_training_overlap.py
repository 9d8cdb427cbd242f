"""``score`` says when it scores the model's own training data: series whose UID, or files whose
content, the model folder's ``training_data.json`` lists get a warning, are counted in
``summary.json`` and named on the console; other series get none."""

from __future__ import annotations

import json
import shutil

from lung_effnet.models.training_data import FILE_NAME, IN_TRAINING, write_training_data
from tests.scoring.test_score import _run_cli, archive, trained  # noqa: F401 - fixtures


def test_series_the_model_was_trained_on_are_flagged(trained, archive, tmp_path, read_csv):  # noqa: F811
    root = archive[0]
    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    clean = tmp_path / "clean"
    assert _run_cli(["score", "-q", "--model", str(model), "--input", str(root), "--out", str(clean), "--workers", "0"])[0] == 0
    rows = {r["path"]: r for r in read_csv(clean / "predictions.csv")}
    assert not any(IN_TRAINING in r["warnings"] for r in rows.values())  # no record: nothing claimed
    assert json.loads((clean / "summary.json").read_text())["counts"]["series_in_training_data"] == 0

    # the model "was trained on" one DICOM series (by UID) and the JPG (by content), under other paths
    dicom = next(r for r in rows.values() if r["kind"] == "dicom")
    copy = tmp_path / "elsewhere" / "slice.jpg"
    copy.parent.mkdir()
    shutil.copy(root / "img" / "slice.jpg", copy)
    write_training_data(model, [{"path": str(copy), "series_uid": ""},
                                {"path": str(root / dicom["key_file"]), "series_uid": dicom["series_uid"]}])
    assert (model / FILE_NAME).is_file()
    out = tmp_path / "out"
    code, printed = _run_cli(["score", "-q", "--model", str(model), "--input", str(root), "--out", str(out), "--workers", "0"])
    assert code == 0, printed
    flagged = sorted(r["path"] for r in read_csv(out / "predictions.csv") if IN_TRAINING in r["warnings"])
    assert flagged == sorted([dicom["path"], "img/slice.jpg"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["series_in_training_data"] == 2
    assert "2 of the" in printed and "training data" in printed
    # the same with --pseudonymize-uids: the UIDs in the outputs change, what the model saw does not
    key = tmp_path / "uid.key"
    key.write_text("a-test-key-of-enough-characters-0123\n")
    pseudo = tmp_path / "pseudo"
    code, printed = _run_cli(["score", "-q", "--model", str(model), "--input", str(root), "--out", str(pseudo),
                              "--workers", "0", "--pseudonymize-uids", str(key)])
    assert code == 0, printed
    rows = read_csv(pseudo / "predictions.csv")
    assert sorted(r["path"] for r in rows if IN_TRAINING in r["warnings"]) == sorted([dicom["path"], "img/slice.jpg"])
    assert dicom["series_uid"] not in {r["series_uid"] for r in rows}  # pseudonymized, and still recognised

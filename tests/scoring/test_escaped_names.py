"""A file whose name holds a byte that is not UTF-8 (shown ``caf\\xe9.jpg``) and a file literally named
``caf\\xe9.jpg`` are two ledger rows in ``score``, not one key for two files (a RuntimeError)."""

from __future__ import annotations

import os
import shutil

from lung_effnet.synthetic.dataset import write_synthetic_dataset
from tests.scoring.test_score import _run_cli


def test_a_non_utf8_name_and_its_escape_spelled_out_are_two_rows(tiny_model_dir, tmp_path, read_csv):
    jpg = write_synthetic_dataset(tmp_path / "jpg", "jpg", n_patients=1, seed=3, size_px=32, n_slices=3, progress=False)
    root = tmp_path / "in"
    root.mkdir()
    image = sorted(jpg.rglob("*.jpg"))[0]
    shutil.copy(image, root / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(image, root / "caf\\xe9.jpg")  # a backslash, x, e, 9
    code, printed = _run_cli(["score", "-q", "--model", str(tiny_model_dir), "--input", str(root),
                              "--out", str(tmp_path / "out"), "--workers", "0"])
    assert code == 0, printed
    files = {r["path"]: r["status"] for r in read_csv(tmp_path / "out" / "files.csv")}
    assert files == {"caf\\xe9.jpg": "failed", "caf\\\\xe9.jpg": "used"}
    errors = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert errors == {"caf\\xe9.jpg": "file name is not valid UTF-8: rename it to use it"}
    # the scored file is spelled as in files.csv in every output, not raw in some (one name, one spelling)
    (prediction,) = read_csv(tmp_path / "out" / "predictions.csv")
    assert prediction["path"] == prediction["key_file"] == "caf\\\\xe9.jpg"
    assert {r["file"] for r in read_csv(tmp_path / "out" / "slice_scores.csv")} == {"caf\\\\xe9.jpg"}

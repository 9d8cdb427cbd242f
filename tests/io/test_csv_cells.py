"""CSV cells that a spreadsheet would run as a formula (OWASP "CSV Injection") are quoted by every
writer of the package (``io.ledger.write_csv``) and read back as written by its readers."""

from __future__ import annotations

import csv

import pytest

from lung_effnet.ingest.manifest import read_table
from lung_effnet.io.ledger import csv_value, read_csv_rows, spreadsheet_safe, write_csv


@pytest.mark.parametrize("value, written", [
    ("=1+1.jpg", "'=1+1.jpg"),
    ("@SUM(A1).png", "'@SUM(A1).png"),
    ("+cmd.dcm", "'+cmd.dcm"),
    ("-x.png", "'-x.png"),
    ("\tx", "'\tx"),
    ("\rx", "'\rx"),
    ("'=x", "''=x"),          # looks escaped already: escaped once more, so that it reads back exact
    ("-0.5", "-0.5"),         # numbers stay numbers
    ("-1000", "-1000"),
    ("+3", "+3"),
    ("1e-3", "1e-3"),
    ("-2.5E+3", "-2.5E+3"),
    ("'abc", "'abc"),
    ("a=b", "a=b"),
    ("", ""),
])
def test_cells_are_quoted_as_spreadsheets_expect_and_read_back(value, written):
    assert spreadsheet_safe(value) == written
    assert csv_value(written) == value


def test_write_csv_quotes_text_not_numbers_and_the_readers_undo_it(tmp_path):
    path = write_csv(tmp_path / "t.csv", ("path", "hu", "p", "note"), [
        {"path": "=HYPERLINK(\"http://x\").png", "hu": -1000, "p": -0.5, "note": "-1024"},
        {"path": "@SUM(A1).png", "hu": "-600", "p": "0.25", "note": "-not a number"},
    ])
    with open(path, newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert [r["path"] for r in raw] == ["'=HYPERLINK(\"http://x\").png", "'@SUM(A1).png"]
    assert [(r["hu"], r["p"], r["note"]) for r in raw] == [("-1000", "-0.5", "-1024"), ("-600", "0.25", "'-not a number")]
    back = read_csv_rows(path)
    assert back[0]["path"] == "=HYPERLINK(\"http://x\").png" and back[1]["note"] == "-not a number"
    assert [r["path"] for r in read_table(path, ("path",))] == [r["path"] for r in back]


def test_a_manifest_with_formula_names_ingests_and_reads_back(tmp_path, read_csv):
    """A sample file named ``=1+1.png`` next to the manifest: its rows in files.csv and series.csv are
    quoted, a numeric-looking study id (``-42``) is not, and the written manifest reads back to the
    same rows (training and the report read it again)."""
    import numpy as np
    from PIL import Image

    from lung_effnet.ingest.manifest import read_manifest
    from lung_effnet.ingest.sources import ingest

    for i, name in enumerate(("=1+1.png", "@SUM(A1).png", "plain.png")):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id,study_id\n=1+1.png,benign,A,-42\n@SUM(A1).png,normal,B,=S2\n"
                        "plain.png,malignant,C,S3\n")
    result = ingest(manifest, tmp_path / "out", progress=False)
    files = (tmp_path / "out" / "files.csv").read_text()
    assert "\n'=1+1.png," in files and "\n'@SUM(A1).png," in files
    series = read_csv(tmp_path / "out" / "series.csv")
    assert {r["series_uid"] for r in series} == {"'=1+1.png", "'@SUM(A1).png", "plain.png"}
    assert {r["study_id"] for r in series} == {"-42", "'=S2", "S3"}
    back = read_manifest(tmp_path / "out" / "manifest.csv")
    assert [(r["path"], r["study_id"]) for r in back] == [(r["path"], r["study_id"]) for r in result.rows]
    assert {r["study_id"] for r in back} == {"-42", "=S2", "S3"}

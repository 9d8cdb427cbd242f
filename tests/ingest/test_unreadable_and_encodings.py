"""Ingest inputs a review found still crashing or confusing: unreadable SOURCE folders, labels and
manifests (permission denied), UTF-16 without a byte-order mark and Latin-1 CSVs, file names that
escape to another file's name, and an --out inside SOURCE read back as input on the next run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lung_effnet.cli import main
from lung_effnet.errors import ManifestError
from lung_effnet.ingest.manifest import read_table
from lung_effnet.synthetic.dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def jpg_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("jpg"), "jpg", n_patients=1, seed=0, size_px=32,
                                   n_slices=3, progress=False)


@pytest.fixture(scope="module")
def nifti_data(tmp_path_factory) -> Path:
    """A tree with ``labels.csv``."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("nifti"), "nifti", n_patients=1, seed=0, size_px=32,
                                   n_slices=3, progress=False)


def _cli(args, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


# --- 4: unreadable inputs ------------------------------------------------------------------------

def _one_line(done, *words: str) -> None:
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert all(w in err[0] for w in words), err[0]


@contextmanager
def no_permissions(*paths: Path) -> Iterator[None]:
    """The paths with mode 0 (unreadable to the unprivileged user), their modes restored after."""
    modes = [p.stat().st_mode for p in paths]
    for path in paths:
        path.chmod(0)
    try:
        yield
    finally:
        for path, mode in zip(paths, modes):
            path.chmod(mode)


def test_an_unreadable_source_folder_is_one_line(jpg_data, nifti_data, unprivileged):
    run, base = unprivileged
    class_root = base / "classes"
    shutil.copytree(jpg_data / "Bengin cases", class_root / "Bengin cases")
    tree = base / "tree"
    shutil.copytree(nifti_data, tree)
    shutil.copy(nifti_data / "labels.csv", base / "labels.csv")
    with no_permissions(class_root, tree):
        _one_line(run(["ingest", "-q", class_root, "--out", base / "o1"]), "classes", "permission denied")
        _one_line(run(["ingest", "-q", tree, "--labels", base / "labels.csv", "--out", base / "o2"]),
                  "tree", "permission denied")
        _one_line(run(["train", "-q", "--data", class_root, "--out", base / "o3"]), "classes", "permission denied")


def test_unreadable_labels_and_manifest_are_one_line(nifti_data, unprivileged):
    run, base = unprivileged
    data = base / "data"
    shutil.copytree(nifti_data, data)
    labels = base / "labels.csv"
    shutil.copy(nifti_data / "labels.csv", labels)
    manifest = base / "manifest.csv"
    manifest.write_text("path,label,patient_id\na.jpg,benign,p1\n")
    with no_permissions(labels, manifest):
        _one_line(run(["ingest", "-q", data, "--labels", labels, "--out", base / "o1"]), "labels.csv", "permission denied")
        _one_line(run(["ingest", "-q", manifest, "--out", base / "o2"]), "manifest.csv", "permission denied")
        _one_line(run(["train", "-q", "--data", data, "--labels", labels, "--out", base / "o3"]),
                  "labels.csv", "permission denied")
        _one_line(run(["train", "-q", "--data", manifest, "--out", base / "o4"]), "manifest.csv", "permission denied")


# --- 5: encodings --------------------------------------------------------------------------------

def test_utf16_without_a_byte_order_mark_is_named_not_shown_as_nul_bytes(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes("path,label,patient_id\na.png,benign,p1\n".encode("utf-16-le"))
    with pytest.raises(ManifestError) as info:
        read_table(manifest, ("label",))
    assert "\0" not in str(info.value) and "UTF-16 (no byte-order mark)?" in str(info.value)
    labels = tmp_path / "labels.csv"
    labels.write_bytes("series_uid,label\nx,benign\n".encode("utf-16-le"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"x")
    code, err = _cli(["ingest", "-q", tmp_path / "src", "--labels", labels, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "labels.csv" in err[0] and "UTF-16 (no byte-order mark)?" in err[0] and "\0" not in err[0]


def test_latin1_names_the_byte_and_its_position(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes("path,label,patient_id\nn\xe9.png,benign,p1\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"not UTF-8 text \(byte 0xe9 at position 23, line 2.*save it as CSV UTF-8"):
        read_table(manifest, ("label",))
    manifest.write_bytes(b"\xef\xbb\xbf" + "path,label,patient_id\nn\xe9.png,benign,p1\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"byte 0xe9 at position 26, line 2"):  # counted with the BOM
        read_table(manifest, ("label",))


# --- 6: escaped names -----------------------------------------------------------------------------

def test_a_non_utf8_name_and_its_escape_spelled_out_are_two_rows(jpg_data, tmp_path, capsys, read_csv):
    root = tmp_path / "in"
    root.mkdir()
    image = sorted(jpg_data.rglob("*.jpg"))[0]
    shutil.copy(image, root / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(image, root / "caf\\xe9.jpg")  # a backslash, x, e, 9
    code, err = _cli(["ingest", "-q", root, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    files = {r["path"]: r["status"] for r in read_csv(tmp_path / "out" / "files.csv")}
    assert files == {"caf\\xe9.jpg": "failed", "caf\\\\xe9.jpg": "used"}
    errors = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert errors == {"caf\\xe9.jpg": "file name is not valid UTF-8: rename it to use it"}


# --- 11: --out inside SOURCE ---------------------------------------------------------------------

def test_out_inside_the_source_is_not_read_back_on_a_rerun(tmp_path, capsys, read_csv):
    data = write_synthetic_dataset(tmp_path / "src", "nifti", n_patients=2, seed=0, size_px=32, n_slices=3,
                                   progress=False)
    args = ["ingest", "-q", data, "--labels", data / "labels.csv", "--out", data / "out", "--nifti"]
    code, err = _cli(args, capsys)
    assert code == 0, err
    first = read_csv(data / "out" / "files.csv")
    manifest = read_csv(data / "out" / "manifest.csv")
    code, err = _cli(args, capsys)
    assert code == 0, err
    assert read_csv(data / "out" / "files.csv") == first
    assert read_csv(data / "out" / "manifest.csv") == manifest
    assert not any(r["path"].startswith("out/") for r in first)


@pytest.mark.parametrize("command", ["ingest", "train"])
def test_out_that_is_or_holds_the_source_is_refused(nifti_data, tmp_path, capsys, command):
    data = tmp_path / "parent" / "data"
    shutil.copytree(nifti_data, data)
    for out in (data, tmp_path / "parent"):
        args = (["ingest", "-q", data, "--labels", data / "labels.csv"] if command == "ingest"
                else ["train", "-q", "--data", data, "--labels", data / "labels.csv"])
        code, err = _cli([*args, "--out", out], capsys)
        assert code == 2 and len(err) == 1 and "--out" in err[0] and "holds" in err[0], err
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in nifti_data.iterdir())

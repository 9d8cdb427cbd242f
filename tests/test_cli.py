"""The command line: help that explains, one clear line for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lung_effnet.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("synth", "ingest", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["synth", "ingest", "demo"])
def test_each_command_has_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "usage: lung-effnet " + command in capsys.readouterr().out


def test_missing_source_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["ingest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "source not found" in err[0] and "nowhere" in err[0]


def test_missing_labels_file_names_the_option(tmp_path, capsys):
    code = main(["ingest", str(tmp_path), "--out", str(tmp_path / "out"), "--labels", str(tmp_path / "l.csv")])
    assert code == 2
    assert "--labels: file not found" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lung_effnet.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "lung-effnet" in out.stdout


def test_train_on_too_few_patients_is_one_line(tmp_path, capsys, monkeypatch):
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    data = write_synthetic_dataset(tmp_path / "d", "nifti", n_patients=3, seed=0, size_px=32, n_slices=3, progress=False)
    code = main(["train", "-q", "--data", str(data), "--labels", str(data / "labels.csv"), "--out", str(tmp_path / "o"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--set", "data.image_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cv.folds=5 needs at least 5 patients" in err[0]


@pytest.mark.parametrize("make_args, words", [
    (lambda t: ["synth", str(t / "file.txt" / "sub")], ["--out: not a folder", "file.txt"]),
    (lambda t: ["synth", str(t / "s"), "--slices", "2"], ["--slices", "got 2"]),
    (lambda t: ["synth", str(t / "s"), "--format", "jpg", "--compression", "rle"], ["--compression", "--format jpg"]),
    (lambda t: ["synth", str(t / "busy")], ["busy", "not empty"]),
    (lambda t: ["demo", "--out", str(t / "d"), "--patients", "2"], ["--patients", "got 2"]),
    (lambda t: ["report", "--run", str(t / "no" / "run"), "--out", str(t / "r")], ["--run", "no/run"]),
    (lambda t: ["score", "--model", str(t), "--input", str(t), "--out", str(t / "file.txt")], ["--out: not a folder"]),
    (lambda t: ["train", "--data", str(t), "--out", str(t / "o"), "--set", "seed=-1"], ["seed:", "-1"]),
])
def test_user_mistakes_are_one_line_naming_the_flag_and_the_value(tmp_path, capsys, make_args, words):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    code = main(make_args(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    """Only LungEffNetError becomes a one-line exit 2; anything else keeps its traceback."""
    import lung_effnet.cli as cli

    def broken(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_synth", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["synth", "somewhere"])


def test_train_on_a_source_with_nothing_usable_is_one_line(tmp_path, capsys):
    import numpy as np

    from lung_effnet.io.volume import canonical_affine, write_nifti

    hu = np.full((3, 16, 16), np.nan, np.float32)
    write_nifti(tmp_path / "d" / "nan.nii.gz", hu, canonical_affine((1.0, 1.0, 1.0)), dtype=np.float32)
    (tmp_path / "d" / "labels.csv").write_text("path,label\nnan.nii.gz,malignant\n")
    code = main(["train", "-q", "--data", str(tmp_path / "d"), "--labels", str(tmp_path / "d" / "labels.csv"),
                 "--out", str(tmp_path / "o"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (2, 3) and len(err) == 1 and "no usable" in err[0], err


@pytest.mark.parametrize("command", [
    lambda t, out: ["ingest", str(t), "--out", str(out)],
    lambda t, out: ["score", "--model", str(t), "--input", str(t), "--out", str(out)],
    lambda t, out: ["train", "--data", str(t), "--out", str(out)],
], ids=["ingest", "score", "train"])
def test_an_unwritable_out_is_one_line_before_any_work(unprivileged, command):
    """Checked at the start (it used to be a traceback, for ingest after reading the whole source)."""
    run, base = unprivileged
    (base / "ro").mkdir()
    (base / "ro").chmod(0o555)
    try:
        done = run(command(base, base / "ro" / "new" / "out"))
    finally:
        (base / "ro").chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert f"--out: cannot write to {base / 'ro' / 'new' / 'out'}: Permission denied" in err[0]

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

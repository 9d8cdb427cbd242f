"""Folds as separate jobs: ``train --fold K`` then ``--merge`` equals one process; concurrent fold
jobs share one preparation, one ``folds.csv`` and one MLflow parent; the merge refuses missing folds
and folds trained under another config; ``--executor local`` runs the plan through submitit, and the
SLURM plan submits an array and a merge that waits on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lung_effnet.cli import main
from lung_effnet.config import load_config
from lung_effnet.errors import InputError
from lung_effnet.training.cv import run_cv
from tests.training.conftest import TINY


def _children(uri: str, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


def _tiny_cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, f"data.cache_dir={out / 'cache'}", *extra])


def test_fold_jobs_then_merge_equal_one_process(tiny_data, tiny_run, tmp_path):
    ref, ref_summary, _ = tiny_run
    cfg = _tiny_cfg(ref)  # the reference run's cache: its preprocessing, read back
    out, uri, labels = tmp_path / "jobs", f"sqlite:///{tmp_path / 'j.db'}", tiny_data / "labels.csv"
    for fold in (2, 0, 1):  # any order
        result = run_cv(tiny_data, out, cfg, labels_csv=labels, tracking_uri=uri, progress=False, fold=fold)
        assert result["fold"] == fold
    assert result["missing_folds"] == []
    assert not (out / "cv_summary.json").exists() and not (out / "model").exists()  # only the merge assembles
    assert len(list(out.glob("folds/fold_*/last.pt"))) == 3  # a fold job keeps what continuing it needs...
    summary = run_cv(tiny_data, out, cfg, labels_csv=labels, tracking_uri=uri, progress=False, merge=True)
    assert not list(out.glob("folds/fold_*/last.pt")) and len(list(out.glob("folds/fold_*/best.pt"))) == 3  # ...until the end
    assert (out / "oof_predictions.csv").read_bytes() == (ref / "train" / "oof_predictions.csv").read_bytes()
    assert (out / "folds.csv").read_bytes() == (ref / "train" / "folds.csv").read_bytes()
    assert summary["oof"] == ref_summary["oof"] and summary["folds"] == ref_summary["folds"]
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(p.name for p in (ref / "train" / "model").iterdir())
    children = _children(uri, summary["mlflow"]["parent_run_id"])  # one parent, a child per fold, by id
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1", "2"]


def test_merge_refuses_missing_folds_and_folds_of_another_config(tiny_data, tiny_run, tmp_path):
    ref, _, _ = tiny_run
    labels = tiny_data / "labels.csv"
    out = tmp_path / "copy"
    shutil.copytree(ref / "train", out, ignore=shutil.ignore_patterns("mlflow_run.json"))  # its own MLflow store
    shutil.rmtree(out / "folds" / "fold_1")
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    with pytest.raises(InputError, match=r"fold\(s\) 1 of .* not finished"):
        run_cv(tiny_data, out, _tiny_cfg(ref), labels_csv=labels, tracking_uri=uri, progress=False, merge=True)
    shutil.copytree(ref / "train" / "folds" / "fold_1", out / "folds" / "fold_1")
    other = _tiny_cfg(ref, "train.lr=0.01")
    with pytest.raises(InputError, match="fold 0: trained with another config; fold 1: trained with another config; fold 2"):
        run_cv(tiny_data, out, other, labels_csv=labels, tracking_uri=uri, progress=False, merge=True)
    with pytest.raises(InputError, match="--fold: must be 0..2"):
        run_cv(tiny_data, out, other, labels_csv=labels, tracking_uri=uri, progress=False, fold=3)


def test_executor_local_runs_the_folds_as_processes_and_merges(tiny_data, tmp_path, read_csv, capsys):
    """Two fold jobs start together on a fresh --out (submitit's local executor): one preparation,
    one folds.csv, one parent with both folds; then the merge job; --resume submits only the merge."""
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'e.db'}"
    settings = [*TINY, "cv.folds=2", "train.epochs=1", "report.enabled=false", f"data.cache_dir={tmp_path / 'cache'}"]
    args = ["train", "-q", "--data", str(tiny_data), "--labels", str(tiny_data / "labels.csv"), "--out", str(out),
            "--tracking-uri", uri, "--executor", "local"] + [a for s in settings for a in ("--set", s)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fold jobs: fold 0:" in printed and "fold 1:" in printed and "merge job:" in printed
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 2 and len(read_csv(out / "oof_predictions.csv")) == 9 * 4
    assert sorted(r.data.tags["fold"] for r in _children(uri, summary["mlflow"]["parent_run_id"])) == ["0", "1"]
    assert len(list((out / "jobs").glob("*_log.err"))) == 3  # two folds and the merge, each with its log
    assert main(args + ["--resume"]) == 0
    assert "fold jobs: none (all folds finished)" in capsys.readouterr().out


def test_slurm_plan_is_an_array_of_folds_and_a_merge_after_it(tiny_data, tmp_path, fake_slurm, capsys):
    """What goes to SLURM (stand-in ``sbatch``: no cluster here): one array task per fold with the
    partition, GPUs and time limit asked for, then the merge with ``afterok`` on the array; the
    parent run exists before anything is submitted, and the job ids are printed."""
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 's.db'}"
    args = ["train", "-q", "--data", str(tiny_data), "--labels", str(tiny_data / "labels.csv"), "--out", str(out),
            "--tracking-uri", uri, "--executor", "slurm", "--slurm-partition", "gpu", "--gpus-per-fold", "1",
            "--timeout-min", "90"] + [a for s in [*TINY, "cv.folds=2"] for a in ("--set", s)]
    assert main(args) == 0
    state = json.loads((out / "mlflow_run.json").read_text())
    printed = capsys.readouterr().out
    assert f"MLflow parent run {state['parent_run_id']}; fold jobs: fold 0: 4000_0, fold 1: 4000_1; merge job: 4001" in printed
    array, merge = (fake_slurm / "sbatch_4000.sh").read_text(), (fake_slurm / "sbatch_4001.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=90"):
        assert line in array, line
    assert "#SBATCH --dependency=afterok:4000" in merge
    assert not (out / "folds").exists()  # nothing trained here: the jobs do that

"""A resumed run folder whose ``best.pt`` or ``predictions.npy`` is damaged stops with one InputError that
names the file and says to delete it to retrain that fold (no training here)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lung_effnet.errors import InputError
from lung_effnet.training.cv import FOLD_IDENTITY, run_fold, save_ensemble
from lung_effnet.training.fold import load_best_state

IDENTITY = {"config": "c", "data": "d", "folds": "f"}


def _run(out: Path) -> SimpleNamespace:
    """The parts of a ``CVRun`` that reading a finished fold touches: 3 samples, 2 of them in fold 0."""
    return SimpleNamespace(out=out, folds=np.array([0, 0, 1]), cfg=SimpleNamespace(seed=0, cv=SimpleNamespace(folds=1)),
                           identity=IDENTITY)


def _fold_dir(tmp_path: Path) -> Path:
    """Fold 0's folder, with the record of what it was trained under (``cv.FOLD_IDENTITY``)."""
    fold_dir = tmp_path / "folds" / "fold_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / FOLD_IDENTITY).write_text(json.dumps(IDENTITY))
    return fold_dir


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY truncated", b"not numpy at all"])
def test_damaged_predictions_are_one_line_saying_to_delete_the_file(tmp_path, content):
    (_fold_dir(tmp_path) / "predictions.npy").write_bytes(content)
    with pytest.raises(InputError, match=r"predictions\.npy.*delete it to retrain that fold") as info:
        run_fold(_run(tmp_path), 0, progress=False)
    assert "\n" not in str(info.value)


def test_predictions_of_another_shape_are_refused(tmp_path):
    np.save(_fold_dir(tmp_path) / "predictions.npy", np.zeros((5, 3)))
    with pytest.raises(InputError, match=r"predictions\.npy.*delete it"):
        run_fold(_run(tmp_path), 0, progress=False)


def test_intact_predictions_are_read_back(tmp_path):
    np.save(_fold_dir(tmp_path) / "predictions.npy", np.full((2, 3), 1 / 3))
    assert run_fold(_run(tmp_path), 0, progress=False).shape == (2, 3)


@pytest.mark.parametrize("record", [None, b"{not json", json.dumps({**IDENTITY, "config": "other"}).encode()])
def test_a_finished_fold_without_its_identity_or_of_another_config_is_refused(tmp_path, record):
    fold_dir = _fold_dir(tmp_path)
    np.save(fold_dir / "predictions.npy", np.full((2, 3), 1 / 3))
    if record is None:
        (fold_dir / FOLD_IDENTITY).unlink()
    else:
        (fold_dir / FOLD_IDENTITY).write_bytes(record)
    with pytest.raises(InputError, match=r"fold\.json.*delete it|fold 0: (no record|trained with another config)") as info:
        run_fold(_run(tmp_path), 0, progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not torch"])
def test_a_damaged_best_checkpoint_is_one_line_saying_to_delete_it(tmp_path, content):
    best = _fold_dir(tmp_path) / "best.pt"
    best.write_bytes(content)
    with pytest.raises(InputError, match=r"best\.pt.*delete it to retrain that fold") as info:
        save_ensemble(_run(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"best\.pt.*delete it"):
        load_best_state(best, "cpu")  # what FoldTrainer.fit reads back at its end


def test_a_best_checkpoint_that_is_no_state_dict_is_refused(tmp_path):
    best = _fold_dir(tmp_path) / "best.pt"
    torch.save([torch.zeros(1)], best)
    with pytest.raises(InputError, match=r"best\.pt.*delete it"):
        load_best_state(best, "cpu")


def test_a_fold_is_claimed_before_it_trains(tmp_path):
    """``claim_fold``: an interrupted fold (``last.pt``) started under other settings, or with no record
    of them, is refused before any epoch; a fold another process is training is refused; a new fold
    gets this run's record first."""
    import os

    from lung_effnet.io.shared_files import try_lock
    from lung_effnet.training.cv import claim_fold

    fold_dir = tmp_path / "folds" / "fold_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / "last.pt").write_bytes(b"interrupted")
    with pytest.raises(InputError, match="fold 0: no record of what it was trained under"):
        claim_fold(_run(tmp_path), 0)
    (fold_dir / FOLD_IDENTITY).write_text(json.dumps({**IDENTITY, "config": "other"}))
    with pytest.raises(InputError, match="fold 0: trained with another config"):
        claim_fold(_run(tmp_path), 0)
    (fold_dir / FOLD_IDENTITY).write_text(json.dumps(IDENTITY))
    held = try_lock(fold_dir / ".lock", "busy")
    try:
        with pytest.raises(InputError, match="fold 0 of .* is being trained by another process"):
            claim_fold(_run(tmp_path), 0)
    finally:
        os.close(held)
    fresh = tmp_path / "folds" / "fold_1"
    run = _run(tmp_path)
    lock = claim_fold(run, 1)
    os.close(lock)
    assert json.loads((fresh / FOLD_IDENTITY).read_text()) == IDENTITY

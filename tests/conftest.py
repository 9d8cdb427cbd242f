"""Shared fixtures: a fixed pseudonym key (never the user's), quiet progress bars, CSV reading,
pydicom's own test files, an untrained tiny fold ensemble, folders the walk may not list, and the
easy-phantom run of ``tests/easy_run.py`` for the saliency tests."""


from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.easy_run import easy_run as train_easy_run


@pytest.fixture(scope="session", autouse=True)
def _test_environment() -> Iterator[None]:
    """A pseudonym key of the tests' own (never the user's) and no progress bars, for the session
    and the processes it starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LUNG_EFFNET_HASH_KEY", "test-key-not-secret")
        mp.setenv("TQDM_DISABLE", "1")
        yield


def _read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def read_csv() -> Callable[[str | Path], list[dict]]:
    """``read_csv(path)``: the rows of a CSV file as dicts."""
    return _read_csv


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """The real DICOM files pydicom ships (CT, MR, NM, SEG, SR, RT, JPEG 2000, RLE, truncated...)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


TINY_MODEL_SETTINGS = ["data.image_size=32", "data.context_slices=0", "model.zero_init_head=false"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-fold b0 ensemble at 32 px, 1 channel, in the folder ``train`` writes (``save_model_dir``;
    config ``TINY_MODEL_SETTINGS``). Do not change its files: tests of several modules share it.

    Not trained: a one-epoch tiny training leaves BatchNorm statistics near their initial values
    and every slice gets the same probabilities, which would make comparisons toothless.
    Statistics set by forward passes on noise give a model whose output depends on the slice."""
    import torch
    from torch import nn

    from lung_effnet.config import load_config
    from lung_effnet.models.predictor import build_member, save_model_dir

    cfg = load_config(None, TINY_MODEL_SETTINGS)
    states = []
    for fold in range(2):
        torch.manual_seed(fold)
        member = build_member(cfg)
        for module in member.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # cumulative average of the batches below
        with torch.no_grad():
            for _ in range(4):
                member(torch.rand(16, 1, 32, 32))
            member._fc.weight.mul_(0.01)  # logits of a few units on real slices, not saturated softmaxes
        states.append(member.state_dict())
    return save_model_dir(tmp_path_factory.mktemp("tiny-model") / "model", cfg, states)


@pytest.fixture
def locked_folders(monkeypatch) -> None:
    """Folders named ``locked`` cannot be listed (``os.scandir`` raises ``PermissionError``), as for a
    process without permission on them: the walk's handling, without a process that drops root's
    permission bypass (the real thing: the ``unprivileged`` fixture)."""
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture(scope="session")
def easy_run() -> Callable[..., dict]:
    """``easy_run(base, extra=(), n_patients=16)``: train the easy-phantom run under ``base`` once per
    session (config ``TRAIN`` + ``extra``); returns paths, summary and tracking URI."""
    return train_easy_run


@pytest.fixture(scope="session")
def saliency_run(tmp_path_factory, easy_run) -> dict:
    """The default easy-phantom run (16 patients, 3 epochs): a finished run, not a good one."""
    return easy_run(tmp_path_factory.getbasetemp() / "saliency-run")


@pytest.fixture
def unprivileged(tmp_path) -> Iterator[tuple[Callable, Path]]:
    """``(run, base)``: ``run(args)`` runs ``lung-effnet *args`` in a subprocess that file permissions
    apply to (``tests/unprivileged.py``); ``base``: a folder it can reach. Skipped where impossible."""
    import shutil

    from tests.unprivileged import base_dir, runner

    found = runner()
    if found is None:
        pytest.skip("cannot run without permission-bypassing capabilities: no capsh (libcap2-bin), no user nobody")
    run, how = found
    base = base_dir(how, tmp_path)
    yield run, base
    if base != tmp_path:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """Stand-in ``sbatch`` and ``srun`` on PATH (no SLURM here): ``sbatch`` answers job ids from 4000
    on and keeps each batch script submitit wrote as ``<returned folder>/sbatch_<id>.sh``."""
    import stat

    scripts = tmp_path / "slurm"
    bin_dir = scripts / "bin"
    bin_dir.mkdir(parents=True)
    counter = scripts / "next_id"
    counter.write_text("4000\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(cat {counter}); echo $((n + 1)) > {counter}\n'
                                    f'cp "$1" {scripts}/sbatch_$n.sh\necho "Submitted batch job $n"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts

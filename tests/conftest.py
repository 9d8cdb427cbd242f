"""Shared fixtures: a fixed pseudonym key (never the user's), quiet progress bars, CSV reading,
pydicom's own test files, and the easy-phantom run of ``tests/easy_run.py`` for the saliency tests."""


from __future__ import annotations

import csv
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

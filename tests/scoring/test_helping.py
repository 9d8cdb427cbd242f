"""The scoring process helps its decode workers: same results, in order where promised, and it
really takes a share of the work (``scoring.helping``, ``runner.prepared_units``)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from lung_effnet.config import from_dict
from lung_effnet.scoring.discover import discover
from lung_effnet.scoring.helping import helped_map
from lung_effnet.scoring.prepare import finish_unit, prepare_unit
from lung_effnet.scoring.runner import header_map, prepared_units, start_pool


def slow_pid(x: int) -> tuple[int, int]:
    """``(x, pid)`` after a few ms: long enough that the caller finds its workers busy."""
    time.sleep(0.005)
    return x, os.getpid()


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(1) as executor:
        yield executor


@pytest.mark.parametrize("n, chunksize", [(0, 4), (1, 4), (37, 4), (40, 8), (9, 1)])
def test_helped_map_keeps_the_order_and_this_process_takes_a_share(pool, n, chunksize):
    results = list(helped_map(pool, slow_pid, range(n), chunksize=chunksize, in_flight=2))
    assert [x for x, _ in results] == list(range(n))
    pids = {pid for _, pid in results}
    if n > 2 * chunksize:  # more chunks than the pool holds in flight: this process takes some
        assert os.getpid() in pids and len(pids) == 2


def test_helped_map_reraises_a_worker_error(pool):
    with pytest.raises(ZeroDivisionError):
        list(helped_map(pool, divmod_by_zero, range(20), chunksize=2, in_flight=2))


def divmod_by_zero(x: int) -> int:
    return x // 0


@pytest.mark.parametrize("finish", [False, True], ids=["planes handed over", "finished by the worker"])
def test_units_prepared_here_equal_units_prepared_by_a_worker(synthetic_dicom_root, finish):
    """``prepared_units`` with one worker and several series, the workers finishing the images on
    the CPU or handing over the planes: each unit's images equal those of the plain in-process
    path exactly, and every unit comes once. (Which units this process takes depends on timing.)"""
    cfg = from_dict({"data": {"image_size": 48, "context_slices": 1, "crop": "lung"}}).data
    threads = torch.get_num_threads()
    pool = start_pool(1)
    try:
        units = discover(synthetic_dicom_root, progress=False, map_fn=header_map(pool, 1)).units
        plain = discover(synthetic_dicom_root, progress=False).units
        assert [u.key for u in units] == [u.key for u in plain] and [u.files for u in units] == [u.files for u in plain]
        helped = {}
        for unit, prepared in prepared_units(units, cfg, pool, 1, finish=finish):
            assert (prepared.images is not None) == finish  # a worker's finished images, or planes to finish here
            if finish:
                assert prepared.volumes == []
            helped[unit.key] = finish_unit(prepared, cfg).numpy()
    finally:
        pool.shutdown()
    assert torch.get_num_threads() == threads  # the share taken here ran on one thread, then restored
    assert sorted(helped) == sorted(u.key for u in units)
    for unit in units:
        np.testing.assert_array_equal(helped[unit.key], finish_unit(prepare_unit(unit, cfg), cfg).numpy())


@pytest.fixture
def synthetic_dicom_root(tmp_path):
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    root = tmp_path / "archive"
    write_synthetic_dataset(root, fmt="dicom", n_patients=6, seed=3, size_px=96, n_slices=6, progress=False)
    return root

"""The scoring process helps its decode workers: same results, in order where promised, every
unit once, and it really takes a share of the work (``scoring.helping``, ``runner.prepared_units``)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import torch

from lung_effnet.config import from_dict
from lung_effnet.scoring.discover import discover
from lung_effnet.scoring.helping import helped_map
from lung_effnet.scoring.prepare import finish_unit, prepare_unit
from lung_effnet.scoring.runner import header_map, prepared_units, start_pool

CFG = from_dict({"data": {"image_size": 48, "context_slices": 1, "crop": "lung"}}).data


def slow_pid(x: int) -> tuple[int, int]:
    """``(x, pid)`` after a few ms: long enough that the caller finds its workers busy."""
    time.sleep(0.005)
    return x, os.getpid()


def fails_in_a_worker(parent: int, x: int) -> int:
    if os.getpid() != parent:
        raise ZeroDivisionError(f"item {x}")
    return x


def dies_in_a_worker(parent: int, x: int) -> int:
    if os.getpid() != parent:
        os._exit(1)
    time.sleep(0.05)  # here: slowly, so that the pool's failure arrives first
    return x


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


def test_helped_map_raises_what_a_worker_raised(pool):
    with pytest.raises(ZeroDivisionError):
        list(helped_map(pool, partial(fails_in_a_worker, os.getpid()), range(20), chunksize=2, in_flight=2))


def test_helped_map_turns_a_dead_worker_into_one_clear_error():
    with ProcessPoolExecutor(1) as doomed:
        with pytest.raises(RuntimeError, match="decode worker died"):
            list(helped_map(doomed, partial(dies_in_a_worker, os.getpid()), range(8), chunksize=1, in_flight=1))


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    """Six DICOM series of 6 slices and one of 12 (plus their masks: NIfTI units, skipped), with
    their header index."""
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    root = tmp_path_factory.mktemp("archive")
    write_synthetic_dataset(root / "short", fmt="dicom", n_patients=6, seed=3, size_px=96, n_slices=6, progress=False)
    write_synthetic_dataset(root / "long", fmt="dicom", n_patients=1, seed=4, size_px=96, n_slices=12, progress=False)
    return discover(root, progress=False).units


@pytest.fixture(scope="module")
def plain_images(units):
    return {unit.key: finish_unit(prepare_unit(unit, CFG), CFG).numpy() for unit in units}


class SlowThreads(ThreadPoolExecutor):
    """A pool whose tasks start late and record that they ran in it: the caller finds its worker
    busy every time it looks, so it prepares units itself (deterministically, unlike real timing)."""

    def __init__(self):
        super().__init__(1)
        self.ran: list[str] = []

    def submit(self, fn, /, *args, **kwargs):
        def late():
            time.sleep(0.3)
            self.ran.append(args[0].key)
            return fn(*args, **kwargs)

        return super().submit(late)


@pytest.mark.parametrize("finish", [False, True], ids=["planes handed over", "finished by the worker"])
def test_units_prepared_here_and_in_the_pool_come_once_and_equal_the_plain_path(units, plain_images, finish):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # the share taken here runs on one thread; this setting must come back
    try:
        with SlowThreads() as slow:
            got = []
            for unit, prepared in prepared_units(units, CFG, slow, 1, finish=finish):
                assert (prepared.images is not None) == finish  # finished images, or planes to finish here
                got.append((unit.key, finish_unit(prepared, CFG).numpy()))
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    keys = [key for key, _ in got]
    assert sorted(keys) == sorted(plain_images) and len(set(keys)) == len(keys)  # every unit once
    here = set(keys) - set(slow.ran)
    assert here and slow.ran and not here & set(slow.ran)  # both took a share, no unit twice
    for key, images in got:
        np.testing.assert_array_equal(images, plain_images[key])


def test_a_large_unit_is_left_to_the_workers(units):
    """This process does not take a unit larger than those the workers hold (it would leave them
    idle while it works): with the 12-slice series next in line after the three 6-slice ones the
    pool holds (1 worker + PREFETCH 2), the pool prepares it; the smaller ones after it, this one."""
    largest = max(units, key=lambda u: u.n_slices)
    small = [u for u in units if u.n_slices < largest.n_slices]
    assert largest.n_slices == 12 and len(small) >= 5
    order = small[:3] + [largest] + small[3:]
    with SlowThreads() as slow:
        keys = [unit.key for unit, _ in prepared_units(order, CFG, slow, 1)]
    assert largest.key in slow.ran and sorted(keys) == sorted(u.key for u in order)
    assert set(keys) - set(slow.ran)  # and this process still took some


def test_real_worker_processes_give_the_same_images(units, plain_images):
    """The same through ``start_pool`` (forkserver processes, shared-memory tensors) and the
    helped header pass, which must find the same units as the plain one."""
    pool = start_pool(1)
    try:
        root = units[0].root
        assert [u.key for u in discover(root, progress=False, map_fn=header_map(pool, 1)).units] == [u.key for u in units]
        got = {unit.key: finish_unit(prepared, CFG).numpy() for unit, prepared in prepared_units(units, CFG, pool, 1, finish=True)}
    finally:
        pool.shutdown()
    assert got.keys() == plain_images.keys()
    for key, images in got.items():
        np.testing.assert_array_equal(images, plain_images[key])

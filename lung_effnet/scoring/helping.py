"""The scoring process lends a hand to its decode workers whenever it would otherwise wait.

During the header pass the scoring process has nothing else to do, and while scoring it waits
whenever the model is faster than the workers (a GPU, or a small input size). In both cases it
takes the next task itself instead of blocking, so ``workers`` processes plus this one decode: on
the development machine's 2 cores (1 worker) that is the difference between one core decoding and
two (``benchmarks/bench_score.py``, data path; ``benchmarks/RESULTS.md``). On a CPU run the model
usually keeps it busy, and it rarely helps.

A task taken here runs exactly as it would in a worker (same function, same arguments), so the
results do not depend on who ran it; only their order of arrival changes, which the callers
already allow (``prepared_units``) or undo (``helped_map``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block, like a decode worker (``prepare.init_worker``): this
    process's own setting (the model's threads on a CPU run) would put two busy threads beside the
    workers' on their cores while it decodes (on 2 cores, 1 worker: 613 against 797 slices/s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def helped_map(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int,
               in_flight: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, over the pool's workers and this process: chunks of
    ``chunksize`` items go to the pool, at most ``in_flight`` at a time (more than the workers, so
    that none idles while this process is busy); while none of them is finished, this process maps
    the next chunk itself. ``fn`` must be picklable (top level)."""
    chunks = list(_chunked(list(items), chunksize))
    results: dict[int, list] = {}
    pending: dict[Future, int] = {}
    taken = emitted = 0
    try:
        while emitted < len(chunks):
            while len(pending) < in_flight and taken < len(chunks):
                pending[pool.submit(_map_chunk, fn, chunks[taken])] = taken
                taken += 1
            done = [f for f in pending if f.done()]
            if not done and taken < len(chunks):
                with one_thread():
                    results[taken] = _map_chunk(fn, chunks[taken])  # this process's share
                taken += 1
            elif not done:
                done = list(wait(pending, return_when=FIRST_COMPLETED)[0])
            for future in done:
                try:
                    results[pending.pop(future)] = future.result()
                except BrokenProcessPool:
                    raise RuntimeError("a decode worker died (out of memory?) while reading headers; "
                                       "run the same command again") from None
            while emitted in results:
                yield from results.pop(emitted)
                emitted += 1
    finally:
        for future in pending:
            future.cancel()


def _chunked(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def _map_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]

"""Worker side: decode one unit and find where each of its slices is cropped; ``finish_unit``
completes the preprocessing exactly as training did, in the worker on a CPU run, in the scoring
process on the GPU otherwise.

``prepare_unit`` runs in a worker process (or in-process with ``--workers 0``); everything here is a
top-level, picklable function of plain data, so it works under the ``spawn`` start method. The
worker does what needs the CPU and scipy (decode, the lungs' connected components on a grid,
``preprocess.volume.volume_boxes``) and hands over the planes as they were decoded (int16 for most
DICOM, in shared memory: torch tensors cross process boundaries as file descriptors, not pickles).
Windowing, cropping and the area resize, the per-pixel work (``preprocess.volume.finish_volume``),
run on a GPU in the scoring process, batched there, so that the workers only decode; on a CPU run
the workers do them too (``prepare_unit(..., finish=True)``) and hand over the images, since the
scoring process's core is the model's (``benchmarks/bench_score.py``, "data path").

Training's sample from a volume plane (``preprocess.cache.PlaneReader`` + ``load_or_preprocess``) is:
the ``(2c+1, H, W)`` planes of slice k in HU (``context_planes``, edges repeated), the volume's
in-plane spacing ``(dy, dx)`` mm, ``preprocess_sample`` (resample, window, body crop, pad, resize),
stored as float16. 2D images are grey levels, repeated ``2c+1`` times, without spacing. Scoring
runs the same chain with the model's saved ``DataConfig`` on whole volumes (``volume_boxes``, then
``finish_volume``), which gives the same float16 values on the CPU
(``tests/preprocess/test_volume_preprocess.py``).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lung_effnet.config import DataConfig
from lung_effnet.io.dicom_series import load_series
from lung_effnet.io.images2d import read_image_2d
from lung_effnet.io.ledger import Ledger
from lung_effnet.io.nifti import read_nifti
from lung_effnet.io.planes import GRAY, HU
from lung_effnet.io.volume import NonFiniteValuesError
from lung_effnet.preprocess.volume import DecodedVolume, finish_volume, volume_boxes
from lung_effnet.scoring.discover import DICOM, IMAGES, NIFTI, ScoreUnit

MIN_CT_HU = -200.0
"""A CT volume in HU has air or lung (about -1000 HU) somewhere; a NIfTI with no voxel below this
is a mask, a label map or unscaled data, and is skipped rather than scored as nonsense."""

OK, INCOMPLETE, FAILED, SKIPPED = "ok", "incomplete", "failed", "skipped"
"""Series statuses: scored (ok / incomplete: some slices lost or a gap), or not scored."""
SCORED = (OK, INCOMPLETE)


@dataclass
class PreparedItem:
    """One output row's worth of a unit: a series, a volume or one image.

    ``start:stop`` are its slices in the unit's ``images``; ``slice_files`` names the file of each
    (DICOM: one file a slice; NIfTI and images: the file itself).
    """

    path: str
    series_uid: str
    status: str
    start: int = 0
    stop: int = 0
    slice_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PreparedUnit:
    """A decoded unit: ``volumes``, one per series, volume or image, in the order of ``items``;
    ``images``, ``(N, C, S, S)`` float16 in [0, 1], made from them by ``finish_unit`` (``None``
    until then; once made by a worker, ``volumes`` is emptied)."""

    key: str
    volumes: list[DecodedVolume]
    items: list[PreparedItem]
    ledger_rows: list[dict]
    decode_s: float
    images: torch.Tensor | None = None


def finish_unit(prepared: PreparedUnit, cfg: DataConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Window, crop and resize a decoded unit's slices on ``device``; returns them and keeps them
    as ``prepared.images``: ``(N, C, S, S)`` float16, each volume's slices in place. A unit a
    worker finished already (``prepare_unit(..., finish=True)``) is only moved to ``device``."""
    if prepared.images is not None:
        prepared.images = prepared.images.to(device)
        return prepared.images
    channels, size = 2 * cfg.context_slices + 1, cfg.image_size
    images = torch.empty((sum(len(v) for v in prepared.volumes), channels, size, size), dtype=torch.float16, device=device)
    start = 0
    for volume in prepared.volumes:
        finish_volume(volume, cfg, device, out=images[start:start + len(volume)])
        start += len(volume)
    prepared.images = images
    return images


def init_worker(run_pid: int | None = None, gpu_decode: bool = False) -> None:
    """Worker processes use one thread each: parallelism comes from the processes, and torch's
    default of one thread per core in every worker would oversubscribe the machine.

    ``run_pid``: the scoring process; the worker ends when it ends (``die_with``).
    ``gpu_decode``: register nvImageCodec for compressed pixel data (``io.gpu_decode``; the CPU
    decodes where it is missing or not exact)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    reuse_freed_memory()
    if run_pid is not None:
        die_with(run_pid)
    if gpu_decode:
        from lung_effnet.io.gpu_decode import enable_gpu_decode

        enable_gpu_decode()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (``malloc.h``)."""
MMAP_THRESHOLD = 32 << 20
"""glibc's documented maximum for ``M_MMAP_THRESHOLD`` on 64-bit systems (``mallopt(3)``)."""
TRIM_THRESHOLD = 512 << 20
"""Free memory at the top of a worker's heap kept before any is given back to the kernel."""


def reuse_freed_memory() -> None:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse, and up to 512 MiB of free heap,
    instead of returning them to the kernel: a worker allocates and frees tensors of 1-30 MB for every
    series (planes, the padded squares, the resize's intermediates), and by default each is a fresh
    ``mmap`` whose pages fault in one by one on first write. With this the scoring data path's per-pixel
    work costs ~25% less (benchmarks/RESULTS.md). A worker's memory then stays at its peak, which it
    reaches on its largest series anyway. No-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (musl, macOS): its allocator, its defaults
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal the kernel sends a process when its parent dies."""


def die_with(run_pid: int) -> None:
    """End this worker when the scoring process ``run_pid`` ends, however it ends (``kill -9``
    included), instead of waiting forever for tasks: a worker holds the write end of its own task
    queue, so it never sees the queue close, and it holds the forkserver's "alive" pipe, so the
    forkserver (a second ~450 MB process) stays too. A thread waits on a pidfd of ``run_pid``
    (polls it where pidfds are missing) and exits the process; once the workers are gone the
    forkserver exits by itself. On Linux the kernel also kills the worker if its own parent (the
    forkserver) dies (``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        fd: int | None = os.pidfd_open(run_pid)
    except ProcessLookupError:  # it ended before this worker started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): poll
        fd = None
    threading.Thread(target=_exit_when_gone, args=(run_pid, fd), name="exit-with-run", daemon=True).start()


def _exit_when_gone(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])  # a pidfd turns readable when its process ends
    else:
        while _exists(pid):
            time.sleep(0.5)
    os._exit(1)  # no cleanup: the queues' other ends are gone with the run


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_unit(unit: ScoreUnit, cfg: DataConfig, finish: bool = False) -> PreparedUnit:
    """Decode a unit and find its crop boxes; unusable files become ledger rows, never exceptions.

    ``finish``: also window, crop and resize here on the CPU (``finish_unit``) and hand over the
    images instead of the planes: what a CPU run does, where the scoring process's core is the
    model's (the values are the same wherever ``finish_unit`` runs on the CPU). A GPU run leaves
    that to the scoring process, on the device."""
    start = time.perf_counter()
    ledger = Ledger()
    reader = {DICOM: _dicom, NIFTI: _nifti, IMAGES: _images}[unit.kind]
    volumes, items = reader(unit, cfg, ledger)
    rows = [{**row, "stage": ledger.stages.get(path, "")} for path, row in ledger.rows.items()]
    prepared = PreparedUnit(unit.key, volumes, items, rows, time.perf_counter() - start)
    if finish:
        finish_unit(prepared, cfg)
        prepared.volumes = []  # the planes are not needed any more: not handed over
    return prepared


def _fail_all(unit: ScoreUnit, ledger: Ledger, stage: str, reason: str) -> None:
    for rel in unit.files:
        if ledger.rows.get(rel, {}).get("status") not in ("failed", "skipped"):
            ledger.failed(rel, stage, reason, unit.key if unit.kind == DICOM else rel)


def _dicom(unit: ScoreUnit, cfg: DataConfig, ledger: Ledger):
    folder = series_folder(unit.files)
    item = PreparedItem(folder, unit.key, FAILED)
    assert unit.series is not None  # discover gives every DICOM unit its header index
    volume = load_series(unit.series, ledger)  # failed slices -> ledger rows (stage decode)
    if volume is None:
        _fail_all(unit, ledger, "decode", "no slice of the series could be decoded")
        return [], [item]
    try:
        decoded = volume_boxes(volume.hu, HU, cfg, volume.spacing[1:])
    except Exception as exc:  # geometry the transforms cannot take: the series fails, the run goes on
        _fail_all(unit, ledger, "preprocess", f"series not preprocessable: {type(exc).__name__}"[:300])
        return [], [item]
    for rel in volume.source_files:
        ledger.used(rel, unit.key)
    item.status = INCOMPLETE if volume.warnings else OK
    item.stop, item.slice_files, item.warnings = len(decoded), list(volume.source_files), list(volume.warnings)
    return [decoded], [item]


def _nifti(unit: ScoreUnit, cfg: DataConfig, ledger: Ledger):
    rel = unit.files[0]
    item = PreparedItem(rel, rel, FAILED)
    try:
        volume = read_nifti(Path(unit.root) / rel, series_uid=rel)
    except NonFiniteValuesError as exc:  # NaN voxels: failed, never scored (a NaN slice scores "benign")
        ledger.failed(rel, "decode", str(exc), rel)
        return [], [item]
    except Exception as exc:  # not a readable 3D NIfTI: one error row
        ledger.failed(rel, "decode", f"NIfTI not readable: {type(exc).__name__}: {exc}"[:300], rel)
        return [], [item]
    if volume.n_slices == 0 or float(volume.hu.min()) > MIN_CT_HU:
        ledger.skipped(rel, "decode", f"no voxel below {MIN_CT_HU:.0f} HU: not a CT volume in HU (a mask or label map?)", rel)
        item.status = SKIPPED
        return [], [item]
    try:
        decoded = volume_boxes(volume.hu, HU, cfg, volume.spacing[1:])
    except Exception as exc:
        ledger.failed(rel, "preprocess", f"volume not preprocessable: {type(exc).__name__}"[:300], rel)
        return [], [item]
    ledger.used(rel, rel)
    item.status, item.stop, item.slice_files = OK, len(decoded), [rel] * len(decoded)
    return [decoded], [item]


def _images(unit: ScoreUnit, cfg: DataConfig, ledger: Ledger):
    volumes: list[DecodedVolume] = []
    items: list[PreparedItem] = []
    for rel in unit.files:
        try:
            plane = read_image_2d(Path(unit.root) / rel)
            decoded = volume_boxes(plane[None], GRAY, cfg)  # one plane: context repeats it
            # as numpy: a shared-memory tensor holds a file descriptor in the scoring process, and a
            # unit of 64 images times the units in flight would exhaust a 1,024-descriptor limit
            decoded.planes = torch.as_tensor(decoded.planes).numpy()
        except Exception as exc:  # truncated or not really an image, NaN pixels: one row, go on
            reason = str(exc) if isinstance(exc, NonFiniteValuesError) else f"image not decodable: {type(exc).__name__}: {exc}"
            ledger.failed(rel, "decode", reason[:300], rel)
            items.append(PreparedItem(rel, rel, FAILED))
            continue
        ledger.used(rel, rel)
        items.append(PreparedItem(rel, rel, OK, len(volumes), len(volumes) + 1, [rel]))
        volumes.append(decoded)
    return volumes, items


def series_folder(files: list[str]) -> str:
    """The folder that holds a series' files, relative to the input (``.`` for the input itself);
    their deepest common folder when a series is spread over several."""
    parents = [Path(f).parent.parts for f in files]
    common = parents[0]
    for parts in parents[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return Path(*common).as_posix() if common else "."

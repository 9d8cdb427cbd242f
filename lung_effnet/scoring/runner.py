"""The score stage's loop: discover -> decode in workers -> batched ensemble inference -> records.

Decoding and finding the crop boxes (``prepare``) run in ``workers`` processes (``forkserver``, one
thread each), and so do windowing, cropping and resizing on a CPU run; on a GPU the main process does
those there (``prepare.finish_unit``). The main process runs the model, so decode overlaps
inference, and whenever it would wait for the workers (the header pass; a model faster than they
are) it decodes too (``helping``). At most ``workers + PREFETCH`` units are in flight (being
decoded or waiting for the model), plus one the main process decodes itself, which bounds
memory by a few series whatever the archive size. Each finished unit is journaled at once
(``journal``); the final files are rebuilt from the journal at the end (``outputs``), so a killed
run started again with the same command skips finished units and ends with the same files.

Slices are batched within a unit, never across units: a series' probabilities then do not depend
on which other series happened to share its batch, which keeps resumed runs bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError, MissingInputError
from lung_effnet.explain.html import RunContext
from lung_effnet.io.privacy import UidPseudonyms
from lung_effnet.models.bn_fold import inference_copy
from lung_effnet.models.predictor import Predictor, load_model
from lung_effnet.models.training_data import IN_TRAINING, TrainingOverlap
from lung_effnet.scoring.aggregate import TOP_K
from lung_effnet.scoring.dicom_results import (
    Algorithm,
    DicomResultWriter,
    add_dicom_results,
    check_dicom_out_apart,
    dicom_summary,
)
from lung_effnet.scoring.discover import DICOM, Discovery, ScoreUnit, discover
from lung_effnet.scoring.helping import helped_map, one_thread
from lung_effnet.scoring.journal import RECORD_VERSION, Journal
from lung_effnet.scoring.outputs import make_record, pseudonymize_discovery, pseudonymize_prepared, write_outputs
from lung_effnet.scoring.prepare import SCORED, PreparedUnit, finish_unit, init_worker, prepare_unit
from lung_effnet.scoring.saliency import model_context
from lung_effnet.scoring.shards import Shard, inventory_digest, select_shard, write_shard_manifest
from lung_effnet.version import __version__

log = logging.getLogger(__name__)

PREFETCH = 2
"""Decoded units that may wait for the model beyond one per worker."""
HEADER_CHUNK = 64
"""Files per worker task in the header pass (amortises the round trip of a task, ~0.1 ms)."""
RULE = "mean class probabilities of the top_k slices by abnormality (p_benign + p_malignant); key slice = the most abnormal"


def default_workers(device: torch.device) -> int:
    """On a GPU the data path has to keep up with the device: every core but the one that feeds
    it, at most 8. On a CPU the model is the slow part: a 512 px slice takes 1-2 ms of one core to
    decode and preprocess against ~11 ms of a 5-fold b0 on two cores at 96 px, ~70 ms at 224 px
    (``benchmarks/RESULTS.md``, "Batch scoring"), so one worker keeps up on up to ~8 cores, and
    each further one takes cores from the model."""
    cores = os.cpu_count() or 2
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, min(4, cores // 8))


def inference_threads(workers: int) -> int:
    """Torch threads for CPU inference beside ``workers`` decode processes. The first worker shares
    a core with the model (decoding and preprocessing a 512 px slice takes it 1-2 ms against the
    model's 10-70, see ``default_workers``; on 2 cores, 1 thread for the model instead of 2 cost half
    the speed), each further one takes a core of its own."""
    return max(1, (os.cpu_count() or 2) - max(0, workers - 1))


class SliceScorer:
    """Runs the fold ensemble on a unit's slices: ``(N, C, S, S)`` float16 (array, or tensor on any
    device) -> ``(N, 3)`` float64.

    Training's evaluation numerics: fp32 on CPU; bf16 autocast on CUDA when the model was trained
    with ``train.amp``; channels_last when it was trained with it. The ensemble runs as its
    ``models.bn_fold.inference_copy`` (BatchNorm folded into the convolutions), which changes the
    probabilities by float32 rounding only (< 1e-6) and saves ~30% of the time on CPU.
    """

    def __init__(self, predictor: Predictor, batch_size: int):
        self.model, self.device, self.batch_size = inference_copy(predictor.model), predictor.device, batch_size
        self.amp = predictor.config.train.amp and self.device.type == "cuda"
        self.channels_last = predictor.config.train.channels_last
        if self.channels_last:
            # torch's stub of Module.to lacks memory_format, which Module.to accepts at run time
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(images)
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()  # lets the copy below run asynchronously
        out = []
        for start in range(0, len(x), self.batch_size):
            batch = x[start:start + self.batch_size].to(self.device, non_blocking=True).float()
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                out.append(self.model(batch).float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros((0, len(CLASSES)))


def start_pool(workers: int, gpu_decode: bool = False) -> ProcessPoolExecutor | None:
    """The decode processes, started in the background so that their start overlaps model loading
    and the header pass; with ``gpu_decode`` each registers nvImageCodec for compressed pixel data
    where it is installed and decodes exactly (``io.gpu_decode``). ``forkserver`` (where the OS
    has it) imports the worker's modules (torch, pydicom; not MONAI, see ``preprocess.volume``)
    once, in the server, and forks each worker from it; ``spawn`` would import them again in every worker, and plain ``fork`` of a process
    already running torch threads can deadlock. Starting the first worker waits for the server's
    imports (~2 s), hence the thread."""
    if workers == 0:
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([prepare_unit.__module__])
    # workers end when this process ends, even by SIGKILL (init_worker); the forkserver follows
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(os.getpid(), gpu_decode))
    threading.Thread(target=_start_processes, args=(pool, workers), daemon=True).start()
    return pool


def _start_processes(pool: ProcessPoolExecutor, workers: int) -> None:
    """Submit no-ops, which make the pool start its processes now (``submit`` is thread-safe)."""
    try:
        for _ in range(workers):
            pool.submit(int)
    except RuntimeError:  # the run ended (an error before the first unit) and shut the pool down
        pass


def prepared_units(units: list[ScoreUnit], cfg, pool: ProcessPoolExecutor | None, workers: int,
                   finish: bool = False) -> Iterator[tuple[ScoreUnit, PreparedUnit]]:
    """Yield ``(unit, prepared)`` as workers finish them (any order); in-process without a pool.

    While no worker has a unit ready, this process prepares the next one itself (``helping``), on
    one thread, if it is no larger than every unit the workers hold: nothing is submitted while it
    works, so a large series here would leave the workers idle once their queue ran dry.
    ``finish``: the workers also window, crop and resize, on the CPU (``prepare_unit``)."""
    if pool is None:
        for unit in units:
            yield unit, prepare_unit(unit, cfg, finish)
        return
    pending: dict[Future[PreparedUnit], ScoreUnit] = {}
    queue = deque(units)
    try:
        while True:
            # no prefetch for the last units: queued behind a busy worker they would wait while this
            # process, out of units, waits for them
            while len(pending) < max(workers, 1) + (PREFETCH if len(queue) > workers + PREFETCH else 0) and queue:
                queued = queue.popleft()
                pending[pool.submit(prepare_unit, queued, cfg, finish)] = queued
            if not pending:
                return
            done = {future for future in pending if future.done()}
            if not done and queue and queue[0].n_slices <= min(u.n_slices for u in pending.values()):
                queued = queue.popleft()
                with one_thread():  # every worker is busy: this one here, as one more worker
                    prepared = prepare_unit(queued, cfg, finish)
                yield queued, prepared
                continue
            if not done:
                done = wait(pending, return_when=FIRST_COMPLETED)[0]
            for future in done:
                unit = pending.pop(future)
                try:
                    yield unit, future.result()
                except BrokenProcessPool:
                    raise RuntimeError("a decode worker died (out of memory?); finished series are kept: "
                                       "run the same command again to resume") from None
    finally:
        for future in pending:
            future.cancel()


def header_map(pool: ProcessPoolExecutor | None, workers: int):
    """The header pass's ``map`` (``discover``'s ``map_fn``): over the decode workers and this
    process (``helping.helped_map``; serially it takes about as long as decoding), or ``None``
    (this process alone) without a pool."""
    if pool is None:
        return None
    return partial(helped_map, pool, chunksize=HEADER_CHUNK, in_flight=2 * workers)


def model_fingerprint(predictor: Predictor) -> str:
    """Digest of the ensemble's weights and its preprocessing: the identity a resume must match."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(predictor.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    data = {k: v for k, v in vars(predictor.config.data).items() if k != "cache_dir"}
    h.update(repr(sorted(data.items())).encode())
    return h.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device: must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: 'cuda', but no CUDA device is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def score_archive(model: str | Path, input_dir: str | Path, out_dir: str | Path, *, batch_size: int = 32,
                  device: str = "auto", workers: int | None = None, saliency: bool = False, top_k: int = TOP_K,
                  progress: bool = True, pseudonymize_uids: str | Path | None = None,
                  dicom_out: str | Path | None = None, shard: Shard | str | None = None) -> dict:
    """Score every series, volume and image under ``input_dir`` with a trained model; write the
    outputs (``outputs`` module docstring) to ``out_dir`` and return the summary.

    Args:
        model: a ``train`` model folder (or its output folder) or an MLflow model URI.
        batch_size: slices per forward pass (also the size of 2D image groups).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        workers: decode processes; 0 decodes in this process; ``None``: ``default_workers(device)``.
        pseudonymize_uids: a key file: every Series Instance UID in the outputs (and the resume
            records, and saliency pages) becomes its keyed pseudonym (``io.privacy.UidPseudonyms``).
        dicom_out: a folder outside ``input_dir`` and ``out_dir``: each scored DICOM series' SR (and,
            with ``saliency``, its Grad-CAM Secondary Capture) goes there (``dicom_results``).
        shard: ``Shard(i, N)`` or ``"i/N"``: score only this shard's series and files (``shards``);
            ``merge.merge_scores`` joins the N shards' folders into the unsharded outputs.

    Raises:
        FileNotFoundError: ``input_dir`` or the model does not exist.
        ValueError: a bad option; ``OutputMismatchError`` when ``out_dir`` holds another run.
    """
    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.exists():
        raise MissingInputError(f"--input not found: {input_dir}")
    if batch_size < 1 or top_k < 1 or (workers is not None and workers < 0):
        raise InputError(f"--batch-size and top_k must be >= 1, --workers >= 0; got {batch_size}, {top_k}, {workers}")
    if dicom_out is not None:
        dicom_out = check_dicom_out_apart(dicom_out, **{"--input": input_dir, "--out": out_dir})
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    dev = resolve_device(device)
    uids = UidPseudonyms.from_key_file(pseudonymize_uids) if pseudonymize_uids is not None else None
    workers = default_workers(dev) if workers is None else workers
    pool = start_pool(workers, gpu_decode=dev.type == "cuda")
    try:
        return _score(model, input_dir, out_dir, dev, pool, started, batch_size=batch_size, workers=workers,
                      saliency=saliency, top_k=top_k, progress=progress, uids=uids, dicom_out=dicom_out, shard=shard)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _score(model, input_dir: Path, out_dir: Path, dev: torch.device, pool, started: float, *, batch_size: int,
           workers: int, saliency: bool, top_k: int, progress: bool, uids: UidPseudonyms | None = None,
           dicom_out: Path | None = None, shard: Shard | None = None) -> dict:
    predictor = load_model(model, str(dev))
    decode = "pydicom (CPU)"
    if dev.type == "cuda":  # here for --workers 0 and for the record; each worker registers its own
        from lung_effnet.io.gpu_decode import enable_gpu_decode

        decode = enable_gpu_decode()[1]
        log.info("compressed DICOM: %s", decode)
    fingerprint = model_fingerprint(predictor)
    journal = Journal(out_dir, {"version": RECORD_VERSION, "model": fingerprint,
                                "rule": RULE, "top_k": top_k, "saliency": saliency,
                                **({"uid_key": uids.fingerprint} if uids is not None else {}),
                                **({"dicom_out": str(dicom_out)} if dicom_out is not None else {}),
                                **({"shard": shard.as_dict()} if shard is not None else {})})
    dicom = None
    if dicom_out is not None:
        dicom = DicomResultWriter(dicom_out, input_dir, Algorithm(
            name=f"lung-effnet {predictor.config.model.name} ensemble of {len(getattr(predictor.model, 'members', [None]))} folds",
            version=f"{__version__}+{fingerprint[:12]}", fingerprint=fingerprint, rule=RULE, top_k=top_k))
    discovery = discover(input_dir, exclude=out_dir, group_size=batch_size, progress=progress,
                         map_fn=header_map(pool, workers))
    if shard is not None:  # on UIDs as found: a series' shard does not depend on the pseudonym key
        inventory, n_files_total = inventory_digest(discovery), discovery.n_files
        discovery = select_shard(discovery, shard, group_size=batch_size)
    if uids is not None:  # before the journal is asked: records are keyed by pseudonym
        discovery = pseudonymize_discovery(discovery, uids)
    records = {u.key: r for u in discovery.units if (r := journal.load(u)) is not None}
    todo = [u for u in discovery.units if u.key not in records]
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # within the caller's limit (OMP_NUM_THREADS, torch.set_num_threads)
        torch.set_num_threads(min(threads, inference_threads(workers)))
    try:
        done = run_units(todo, discovery, predictor, journal, records, batch_size, pool, workers, saliency, top_k,
                         out_dir, progress, uids, dicom, model_context(model) if saliency else None)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started
    info = {
        "model": {"source": str(model), "name": predictor.config.model.name,
                  "n_folds": len(getattr(predictor.model, "members", [None])),
                  "image_size": predictor.config.data.image_size, "context_slices": predictor.config.data.context_slices},
        "aggregation": {"rule": RULE, "top_k": top_k},
        "run": {"device": str(dev), "workers": workers, "batch_size": batch_size, "lung_effnet_version": __version__,
                "decode": decode,
                "units_resumed": len(records) - done["units"], "units_scored": done["units"],
                "slices_scored": done["slices"], "wall_s": round(wall, 3),
                "series_per_min": round(done["series"] / wall * 60, 2), "slices_per_s": round(done["slices"] / wall, 2)},
    }
    if shard is not None:
        info["shard"] = shard.as_dict()
    ordered = [records[u.key] for u in discovery.units]
    if dicom_out is not None:
        info["dicom_out"] = dicom_summary(ordered, dicom_out)
    summary = write_outputs(out_dir, discovery, ordered, info, uids)
    if shard is not None:  # last: it marks the shard finished for ``merge``
        write_shard_manifest(out_dir, shard, discovery, inventory, n_files_total)
    return summary


def run_units(todo: list[ScoreUnit], discovery: Discovery, predictor: Predictor, journal: Journal, records: dict,
              batch_size: int, pool, workers: int, saliency: bool, top_k: int, out_dir: Path, progress: bool,
              uids: UidPseudonyms | None = None, dicom: DicomResultWriter | None = None,
              context: RunContext | None = None) -> dict:
    """Score ``todo``, journaling each unit as it finishes; returns counts for this invocation.
    ``dicom``: writes each scored DICOM series' SR / SC before its record is journaled; ``context``:
    what the model's train run measured, shown on each saliency page (``saliency.model_context``)."""
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    scorer = SliceScorer(predictor, batch_size)
    total = sum(u.n_slices for u in discovery.units)
    bar = tqdm(total=total, initial=total - sum(u.n_slices for u in todo), unit="slice", desc="score",
               disable=not progress, dynamic_ncols=True)
    n_series = sum(1 if u.kind != "images" else len(u.files) for u in discovery.units)
    done_series = n_series - sum(1 if u.kind != "images" else len(u.files) for u in todo)
    counts, started = {"units": 0, "series": 0, "slices": 0}, time.perf_counter()
    with bar:
        for unit, prepared in prepared_units(todo, predictor.config.data, pool, workers,
                                             finish=predictor.device.type == "cpu"):
            images = finish_unit(prepared, predictor.config.data, predictor.device)
            probs = scorer(images)
            if predictor.training_overlap is not None:
                mark_training_overlap(unit, prepared, predictor.training_overlap)
            if uids is not None:
                prepared = pseudonymize_prepared(prepared, uids, dicom=unit.kind == DICOM)
            key_maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            report = _reporter(predictor, prepared, probs, out_dir, key_maps, context) if saliency else None
            record = make_record(unit, prepared, probs, top_k, report)
            if dicom is not None and unit.kind == DICOM:
                add_dicom_results(record, dicom, key_maps)
            journal.save(record)
            records[unit.key] = record
            n = sum(1 for i in record["items"] if "probs" in i)
            counts["units"] += 1
            counts["series"] += n
            counts["slices"] += len(images)
            done_series += len(record["items"])
            bar.update(unit.n_slices)
            bar.set_postfix_str(f"{done_series}/{n_series} series, "
                                f"{counts['series'] / (time.perf_counter() - started):.2f} series/s")
    return counts


def mark_training_overlap(unit: ScoreUnit, prepared: PreparedUnit, overlap: TrainingOverlap) -> None:
    """Add ``IN_TRAINING`` to the warnings of each scored series the model was trained on: a DICOM
    series by its UID as found in its headers (``unit.series``: never the pseudonym that
    ``--pseudonymize-uids`` puts in the unit's key), a volume or an image by its content
    (``models.training_data``)."""
    for item in (i for i in prepared.items if i.status in SCORED):
        seen = (overlap.seen_series(unit.series.series_uid) if unit.kind == DICOM and unit.series is not None
                else overlap.seen_file(Path(unit.root) / item.path))
        if seen:
            item.warnings.append(IN_TRAINING)


def _reporter(predictor: Predictor, prepared: PreparedUnit, probs: np.ndarray, out_dir: Path,
              key_maps: dict[str, tuple[np.ndarray, np.ndarray]], context: RunContext | None = None):
    """The ``report`` callback of ``make_record``; it also keeps each series' key slice and its map
    in ``key_maps`` (by series UID as recorded), for ``--dicom-out``'s overlay."""
    from lung_effnet.scoring.saliency import write_series_report

    def report(entry: dict, rows: np.ndarray) -> str:
        indices = [int(r) - _item_start(prepared, entry) for r in rows]
        assert prepared.images is not None  # finish_unit ran before any report
        key_slices = prepared.images[torch.as_tensor(rows, dtype=torch.long, device=prepared.images.device)].cpu().numpy()
        name, key_maps[entry["series_uid"]] = write_series_report(predictor.model, key_slices, indices, probs[rows],
                                                                   entry, out_dir, context)
        return name

    return report


def _item_start(prepared: PreparedUnit, entry: dict) -> int:
    return next(i.start for i in prepared.items if i.series_uid == entry["series_uid"])

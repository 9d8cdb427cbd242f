"""Batch scoring: an archive of CT studies in, one row per series out, every file accounted for.

Stages, one module each: ``discover`` (walk the input: DICOM series by SeriesInstanceUID, NIfTI
volumes, 2D images; skips with reasons), ``prepare`` (decode + training's preprocessing, in worker
processes), ``aggregate`` (slice probabilities -> series result: the mean of the top-k most
abnormal slices, ``aggregate`` docstring), ``journal`` (atomic per-series records for resume),
``outputs`` (predictions.csv, slice_scores.csv, files.csv, errors.csv, summary.json), ``saliency``
(optional Grad-CAM pages) and ``runner`` (the loop). ``score_archive`` is the entry point.
Sharded scoring: ``shards`` (which series and files a ``--shard i/N`` run takes), ``merge``
(``merge-scores``: N shard folders -> the unsharded outputs), ``plan`` (the shard jobs and the
merge as cluster jobs, ``lung_effnet.cluster``).
"""

__all__ = ["score_archive", "aggregate_series", "TOP_K", "OutputMismatchError"]
_HOME = {"score_archive": "lung_effnet.scoring.runner", "aggregate_series": "lung_effnet.scoring.aggregate",
         "TOP_K": "lung_effnet.scoring.aggregate", "OutputMismatchError": "lung_effnet.errors"}


def __getattr__(name: str):
    """Names resolved on first use: the decode workers import ``prepare`` alone, and must not pay
    for ``runner``'s imports (the model, hence MONAI: seconds per worker start)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOME[name]), name)

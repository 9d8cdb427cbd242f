"""Batch scoring: an archive of CT studies in, one row per series out, every file accounted for.

Stages, one module each: ``discover`` (walk the input: DICOM series by SeriesInstanceUID, NIfTI
volumes, 2D images; skips with reasons), ``prepare`` (decode + training's preprocessing, in worker
processes), ``aggregate`` (slice probabilities -> series result: the mean of the top-k most
abnormal slices, ``aggregate`` docstring), ``journal`` (atomic per-series records for resume),
``outputs`` (predictions.csv, slice_scores.csv, files.csv, errors.csv, summary.json), ``saliency``
(optional Grad-CAM pages) and ``runner`` (the loop). ``score_archive`` is the entry point.
"""

from .aggregate import TOP_K, aggregate_series
from .journal import OutputMismatchError
from .runner import score_archive

__all__ = ["score_archive", "aggregate_series", "TOP_K", "OutputMismatchError"]

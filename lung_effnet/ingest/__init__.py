"""The ingest stage: a source (folders of 2D slices, a DICOM tree, NIfTI volumes, a manifest) -> manifest.

In: the user's source and, optionally, a labels table. Out on disk: ``manifest.csv`` (one row per sample:
path, pseudonymous patient id, label, series, slice index, optional lesion mask), ``series.csv`` (one row
per series), ``files.csv`` (the ledger: every file found, used, skipped or failed, with the reason),
``errors.csv`` (every file not used) and ``ingest.json`` (the summary). No identifier leaves this stage except as a keyed pseudonym.
"""
